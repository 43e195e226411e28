"""The release's generation API on the model: `TwoTowerForGeneration`, what `load_model` returns.

The model layer (model/twotower.py) knows the towers' forwards and nothing of decoding; this
subclass, in the engine layer, adds the release's three `generate_*` methods (same argument names)
served by the streamlined engine, and `save_pretrained`. So the dependency points one way:
engine -> model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import DecodeParams
from ..model import checkpoint
from ..model.twotower import TwoTower
from .engine import Engine
from .request import Request, Stats


class TwoTowerForGeneration(TwoTower):
    """A `TwoTower` with the release's `generate_*` methods (same arguments and defaults:
    `confidence_threshold` 0.9, and `eos_token_id=None` never stops a row), plus
    `generate_speculative`. Per-row statistics of the last call are left in `last_stats` (a list
    of `Stats`, one per input row)."""

    last_stats: list[Stats]

    def generate_mask_diffusion(self, input_ids, max_new_tokens: int = 128, block_size: int = 16,
                                steps_per_block: int = 16, mask_token_id: int = 3, temperature: float = 0.0,
                                confidence_threshold: float = 0.9, eos_token_id=None, **kw):
        """Block-wise mask diffusion (docs/SPEC.md). Returns prompt + generated ids per row."""
        return generate(self, input_ids, "diffusion", max_new_tokens=max_new_tokens, block_size=block_size,
                        steps_per_block=steps_per_block, mask_token_id=mask_token_id, temperature=temperature,
                        confidence_threshold=confidence_threshold, eos_token_id=eos_token_id, **kw)

    def generate_speculative(self, input_ids, max_new_tokens: int = 128, block_size: int = 16,
                             steps_per_block: int = 16, mask_token_id: int = 3, temperature: float = 0.0,
                             confidence_threshold: float = 0.9, eos_token_id=None, **kw):
        """AR's exact output, faster: the denoiser drafts each block, the context tower verifies it
        and keeps what AR agrees with (docs/SPEC.md). Returns prompt + generated ids per row."""
        return generate(self, input_ids, "speculative", max_new_tokens=max_new_tokens, block_size=block_size,
                        steps_per_block=steps_per_block, mask_token_id=mask_token_id, temperature=temperature,
                        confidence_threshold=confidence_threshold, eos_token_id=eos_token_id, **kw)

    def generate_mock_ar(self, input_ids, max_new_tokens: int = 128, temperature: float = 0.0,
                         eos_token_id=None, **kw):
        """One token per step through the denoiser, without time conditioning."""
        return generate(self, input_ids, "mock-ar", max_new_tokens=max_new_tokens, temperature=temperature,
                        eos_token_id=eos_token_id, **kw)

    def generate_ar(self, input_ids, max_new_tokens: int = 128, temperature: float = 0.0,
                    eos_token_id=None, **kw):
        """The context tower alone, token by token."""
        return generate(self, input_ids, "ar", max_new_tokens=max_new_tokens, temperature=temperature,
                        eos_token_id=eos_token_id, **kw)

    def save_pretrained(self, path: str | os.PathLike, **kw) -> None:
        """Write the checkpoint in the released layout (see `model.checkpoint.save_pretrained`)."""
        checkpoint.save_pretrained(self, path, **kw)


def load_model(path: str | os.PathLike, device=None, dtype=None) -> TwoTowerForGeneration:
    """Load a checkpoint directory as a `TwoTowerForGeneration` (see `model.checkpoint.load_model`
    for `device` and `dtype`)."""
    return checkpoint.load_model(path, device=device, dtype=dtype, cls=TwoTowerForGeneration)


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
    confidence_threshold: float = 0.9,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
    max_batch_rows: int = 32,
) -> Tensor | list[list[int]]:
    """Decode every row of `input_ids`; returns prompt + completion per row.

    A tensor input (B, L) gives a tensor (B, L + longest completion) padded with the pad id; a list
    of lists gives a list of lists. `eos_token_id=None` never stops a row early (as the release's
    API); pass the config's `eos_ids` to stop at EOS. Per-row statistics are left in
    `model.last_stats`.
    """
    as_tensor = isinstance(input_ids, Tensor)
    rows = input_ids.tolist() if as_tensor else [list(r) for r in input_ids]
    params = DecodeParams(mode=mode, gamma=confidence_threshold, block_size=block_size,
                          steps_per_block=steps_per_block, temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed, mask_token_id=mask_token_id)
    if eos_token_id is None:
        eos = []  # the release's API: no EOS given, no early stop
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
