"""Held-out quality of the tiny model while it trains, decoded by the engine (docs/SPEC.md).

Exact match per task on (task, prompt, answer) examples, greedy. The decoding is the engine's, the
same code `twotower gen` runs, so the numbers in training.json describe what users get. A row
counts as right only if it ends with EOS and its text (EOS dropped) is the answer.

Stats: `tokens_per_step` uses the one definition (engine.request.Stats): completion tokens,
cut after the first EOS and EOS included, over denoiser steps; `raw_tokens_per_step` counts
every position of each decoded block instead (capped at the token limit).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

from ..config import DecodeParams
from ..engine import Engine, Request
from ..model.twotower import TwoTower


def evaluate(
    model: TwoTower,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    examples: Sequence[tuple[str, str, str]],
    mode: str = "ar",
    max_new_tokens: int = 48,
    batch_size: int = 64,
    gamma: float = 0.8,
    block_size: int = 16,
    steps: int = 16,
    mask_id: int = 3,
) -> dict:
    """Exact-match accuracy per task (and tokens per step for diffusion) on (task, prompt, answer).

    `encode` turns a prompt into the ids the model reads (BOS first, as the tokenizer does)."""
    params = DecodeParams(mode=mode, gamma=gamma, block_size=block_size, steps_per_block=steps,
                          max_new_tokens=max_new_tokens, mask_token_id=mask_id)
    eos = set(model.config.eos_ids)
    engine = Engine(model, max_batch_rows=batch_size)
    reqs = (Request(str(i), encode(p), params) for i, (_, p, _) in enumerate(examples))
    results = {r.id: r for r in engine.run(reqs)}
    hits: dict[str, list[int]] = defaultdict(list)
    tokens = raw = steps_total = 0
    for i, (task, _, answer) in enumerate(examples):
        r = results[str(i)]
        o = r.tokens
        text = decode([t for t in o if t not in eos])
        hits[task].append(int(text == answer and len(o) > 0 and o[-1] in eos))
        tokens += len(o)
        steps_total += r.stats.denoiser_steps
        raw += min(math.ceil(len(o) / block_size) * block_size, max_new_tokens)
    acc = {task: sum(h) / len(h) for task, h in hits.items()}
    res = {"mode": mode, "accuracy": sum(sum(h) for h in hits.values()) / len(examples), "per_task": acc}
    if mode == "diffusion":
        res["tokens_per_step"] = tokens / max(steps_total, 1)
        res["raw_tokens_per_step"] = raw / max(steps_total, 1)
        res["nfe"] = steps_total
    return res
