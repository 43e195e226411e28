"""The release's generation API (same argument names), served by the streamlined engine."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import DecodeParams
from ..model.twotower import TwoTower
from .request import Request
from .scheduler import Engine


def generate(
    model: TwoTower,
    input_ids: Tensor | Sequence[Sequence[int]],
    mode: str,
    *,
    max_new_tokens: int = 128,
    block_size: int = 16,
    steps_per_block: int = 16,
    mask_token_id: int = 3,
    temperature: float = 0.0,
    confidence_threshold: float = 0.8,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
    max_batch_rows: int = 32,
) -> Tensor | list[list[int]]:
    """Decode every row of `input_ids`; returns prompt + completion per row.

    A tensor input (B, L) gives a tensor (B, L + longest completion) padded with the pad id; a list
    of lists gives a list of lists. Per-row statistics are left in `model.last_stats`.
    """
    as_tensor = isinstance(input_ids, Tensor)
    rows = input_ids.tolist() if as_tensor else [list(r) for r in input_ids]
    params = DecodeParams(mode=mode, gamma=confidence_threshold, block_size=block_size,
                          steps_per_block=steps_per_block, temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed, mask_token_id=mask_token_id)
    if eos_token_id is None:
        eos = model.config.eos_ids
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    engine = Engine(model, max_batch_rows=max_batch_rows, eos_ids=eos)
    results = {r.id: r for r in engine.run(Request(str(i), row, params) for i, row in enumerate(rows))}
    ordered = [results[str(i)] for i in range(len(rows))]
    model.last_stats = [r.stats for r in ordered]
    out = [row + r.tokens for row, r in zip(rows, ordered)]
    if not as_tensor:
        return out
    width = max(len(o) for o in out) if out else 0
    t = torch.full((len(out), width), model.config.pad_token_id, dtype=torch.long)
    for b, o in enumerate(out):
        t[b, : len(o)] = torch.tensor(o, dtype=torch.long)
    return t
