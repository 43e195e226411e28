"""The decoding rules: token choice, confidence, the threshold commit rule, and the output cut.

Everything here is per row and vectorised over rows: no quantity mixes rows, so a row's decisions
do not depend on which other rows share its batch (SPEC.md §5, ours).

Sampling noise is a counter-based hash of (seed, row key, position, step, vocab id), not a stateful
generator: the same row gets the same noise whatever its batch, its slot, or a resume. Its
definition (`gumbel`) lives beside the fused kernel that restates it, in twotower_kernels.confidence.
"""

from __future__ import annotations

import torch
from torch import Tensor

import twotower_kernels as kernels
from twotower_kernels.confidence import sampling_floor


def choose(
    logits: Tensor, temperature: Tensor, seed: Tensor, key: Tensor, pos: Tensor, step: Tensor,
    filters: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Proposed tokens and their confidence. logits (B, S, V) fp32 (excluded ids already -inf).

    pred = argmax(logits) at temperature 0, else argmax(logits / T + Gumbel) over the tokens the
    row's sampling filters keep; conf is the temperature-1 probability of pred over the unfiltered
    logits. filters: per-row (top_k, top_p, min_p) (B,) tensors, best on the host, or None when no
    row has one (then nothing is computed for them). Returns (pred (B, S) int64, conf (B, S)
    fp32). The fused kernel runs on CUDA, its torch twin `twotower_kernels.confidence.choose_ref`
    elsewhere; the filters reach both as one floor per position (`confidence.sampling_floor`).
    """
    floor = None if filters is None else sampling_floor(logits, temperature, *filters)
    return kernels.propose(logits, temperature, seed, key, pos, step, floor=floor)


def commit_mask(conf: Tensor, masked: Tensor, gamma: Tensor, k: Tensor, steps: Tensor) -> Tensor:
    """Which masked positions to commit this step (the threshold rule of SPEC.md §5).

    conf/masked (B, S); gamma (B,) float; k (B,) current step; steps (B,) T. Returns (B, S) bool.
    c = max(#(conf > gamma & masked), 1), raised to ceil(n / (T - k)), capped at n; the last step
    commits every masked position. The c most confident masked positions are taken; on an exact
    tie the higher position goes first, as in the released loop (which re-masks the lowest after a
    stable ascending sort). A stable sort over the reversed positions makes this independent of the
    device and the sort's implementation.
    """
    n = masked.sum(1)  # (B,)
    over = ((conf > gamma[:, None]) & masked).sum(1)
    c = over.clamp(min=1)
    remaining = (steps - k).clamp(min=1)
    c = torch.minimum(torch.maximum(c, (n + remaining - 1) // remaining), n)
    c = torch.where(k >= steps - 1, n, c)
    ranked = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
    S = conf.shape[1]
    order = S - 1 - torch.sort(ranked.flip(1), dim=1, descending=True, stable=True).indices  # (B, S)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return masked & (rank < c[:, None])


def settled(block: list[int], mask: int, room: int, eos: set[int]) -> int | None:
    """How many tokens of a partly committed block end the row's output, or None if not yet known.

    The output is cut after the first EOS and at the token limit (`room` = tokens the row may
    still add). Once every position up to an EOS, or up to the limit, is committed, nothing
    decoded later can change the output: the rest of the block would be cut. So the row can
    finish there instead of spending denoiser steps on positions it will throw away (ours).
    """
    for j, tok in enumerate(block):
        if tok == mask:
            return None
        if j + 1 >= room or tok in eos:
            return j + 1
    return None


def ar_scores(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The context tower's view of tokens it did not necessarily choose: log p(token) at
    temperature 1 and whether the token is its greedy choice. logits (..., V) fp32, tokens (...)."""
    lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]
    return lp, logits.argmax(-1) == tokens


def finish(out: list[int], max_new: int, eos: set[int]) -> tuple[list[int], str]:
    """The output as written: cut at `max_new` tokens, then after the first EOS (kept).
    Returns (tokens, finish_reason "eos" or "length")."""
    out = out[:max_new]
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1], "eos"
    return out, "length"


def ended(out: list[int], max_new: int, eos: set[int], new: int | None = None) -> bool:
    """Whether a row's output is decided once `out` holds what it decided so far: the token limit
    is reached, or an EOS is among the last `new` tokens (all of them when None; earlier ones were
    checked when they came)."""
    if len(out) >= max_new:
        return True
    return any(t in eos for t in (out if new is None else out[len(out) - new:]))
