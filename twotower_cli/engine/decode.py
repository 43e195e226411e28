"""The step functions of the three modes: token choice, confidence, and the threshold commit rule.

Everything here is per row and vectorised over rows: no quantity mixes rows, so a row's decisions
do not depend on which other rows share its batch (SPEC.md §5, ours).

Sampling noise is a counter-based hash of (seed, row key, position, step, vocab id), not a stateful
generator: the same row gets the same noise whatever its batch, its slot, or a resume.
"""

from __future__ import annotations

import torch
from torch import Tensor

import twotower_kernels as kernels

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32).

    int64 products wrap in two's complement, so masking keeps the exact low 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def row_stream(seed: Tensor, key: Tensor, pos: Tensor, step: Tensor) -> Tensor:
    """A 32-bit stream id per (row, position). seed/key/step (B,), pos (B, S) -> (B, S) int64."""
    h = _mix32((seed & _M32) ^ 0x9E3779B9)
    h = _mix32(h ^ (key & _M32))
    h = _mix32(h ^ ((key >> 32) & _M32))
    h = _mix32(h ^ (step & _M32))
    return _mix32(h[:, None] ^ (pos & _M32))


def gumbel(seed: Tensor, key: Tensor, pos: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Gumbel(0, 1) noise (B, S, V) fp32 keyed by (seed, row key, position, step, vocab id)."""
    dev = pos.device
    h = row_stream(seed.to(dev), key.to(dev), pos, step.to(dev))  # (B, S)
    v = torch.arange(vocab, device=dev, dtype=torch.int64) * 0x27D4EB2F & _M32
    u = _mix32(h[..., None] ^ v)  # (B, S, V)
    u = (u.double() + 0.5) / 4294967296.0  # strictly inside (0, 1)
    return (-torch.log(-torch.log(u))).float()


def choose(
    logits: Tensor, temperature: Tensor, seed: Tensor, key: Tensor, pos: Tensor, step: Tensor
) -> tuple[Tensor, Tensor]:
    """Proposed tokens and their confidence. logits (B, S, V) fp32 (excluded ids already -inf).

    pred = argmax(logits) at temperature 0, else argmax(logits / T + Gumbel); conf is the
    temperature-1 probability of pred. Returns (pred (B, S) int64, conf (B, S) fp32).
    """
    if kernels.backend(logits.device) == "triton":  # fused kernel (CUDA); choose_ref is its twin
        return kernels.propose(logits, temperature, seed, key, pos, step)
    return choose_ref(logits, temperature, seed, key, pos, step)


def choose_ref(
    logits: Tensor, temperature: Tensor, seed: Tensor, key: Tensor, pos: Tensor, step: Tensor
) -> tuple[Tensor, Tensor]:
    """`choose` in plain torch (the CPU path, and the spec of the fused kernel)."""
    greedy = temperature <= 0  # (B,)
    scores = logits
    if not bool(greedy.all()):
        t = torch.where(greedy, torch.ones_like(temperature), temperature).to(logits)[:, None, None]
        noisy = logits / t + gumbel(seed, key, pos, step, logits.shape[-1])
        scores = torch.where(greedy[:, None, None].to(logits.device), logits, noisy)
    pred = scores.argmax(-1)  # (B, S)
    conf = torch.softmax(logits, dim=-1).gather(-1, pred[..., None])[..., 0]
    return pred, conf


def commit_mask(conf: Tensor, masked: Tensor, gamma: Tensor, k: Tensor, steps: Tensor) -> Tensor:
    """Which masked positions to commit this step (the threshold rule of SPEC.md §5).

    conf/masked (B, S); gamma (B,) float; k (B,) current step; steps (B,) T. Returns (B, S) bool.
    c = max(#(conf > gamma & masked), 1), raised to ceil(n / (T - k)), capped at n; the last step
    commits every masked position. The c most confident masked positions are taken, ties going to
    the lower position (a stable sort), so the result does not depend on the device or sort order.
    """
    n = masked.sum(1)  # (B,)
    over = ((conf > gamma[:, None]) & masked).sum(1)
    c = over.clamp(min=1)
    remaining = (steps - k).clamp(min=1)
    c = torch.minimum(torch.maximum(c, (n + remaining - 1) // remaining), n)
    c = torch.where(k >= steps - 1, n, c)
    ranked = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # (B, S)
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
