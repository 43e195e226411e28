"""Fused token choice and confidence over the vocabulary (SPEC.md §5), Triton + `confidence_ref`.

For each (row, position) of the active block's logits (B, S, V):

    pred = argmax(logits)                     at temperature <= 0
         = argmax(logits / T + Gumbel noise)  otherwise (noise of `gumbel` below)
    conf = softmax(logits)[pred]              always at temperature 1
    the mask id (when given) counts as -inf: never proposed, no probability mass
    a floor (B, S) (when given): a sampled row's tokens with logit < floor cannot be chosen

The floor is how the sampling filters (top-k, top-p, min-p; `sampling_floor` below) reach the
choice: every filter keeps the tokens whose raw logit is at least some per-position value, so the
kernel needs one more scalar per (row, position), not a mask of size V. `conf` ignores it.

The ref materialises softmax and the (B, S, V) noise; the kernel streams V in tiles with a running
max / sum-exp / best score / best index, so nothing of size V is written. Ties go to the lowest
vocab index, as torch.argmax does (first maximum).

Noise: `gumbel` below is its definition (the engine and the reference both sample with it): a
counter hash (murmur3's 32-bit finaliser over seed, row key, step, position, vocab id) and two
logs in fp64, rounded to fp32 once at the end. The kernel restates the hash in uint32 arithmetic
and the logs in fp64. It is bit-identical to `gumbel` wherever the two fp64 `log`
implementations (torch's vs Triton's libdevice or, interpreted, numpy's) agree; they are accurate
to ~1 ulp of fp64, which the final rounding to fp32 hides except with probability ~1e-9 per value
(tests: `gumbel_triton` == `gumbel` bitwise). `conf` is the same probability computed in
another order, within a few fp32 ulps (tests: rtol 1e-5).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .dispatch import load_triton

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32).

    int64 products wrap in two's complement, so masking keeps the exact low 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _row_stream(seed: Tensor, key: Tensor, pos: Tensor, step: Tensor) -> Tensor:
    """A 32-bit stream id per (row, position). seed/key/step (B,), pos (B, S) -> (B, S) int64."""
    h = _mix32((seed & _M32) ^ 0x9E3779B9)
    h = _mix32(h ^ (key & _M32))
    h = _mix32(h ^ ((key >> 32) & _M32))
    h = _mix32(h ^ (step & _M32))
    return _mix32(h[:, None] ^ (pos & _M32))


def gumbel(seed: Tensor, key: Tensor, pos: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Gumbel(0, 1) noise (B, S, V) fp32 keyed by (seed, row key, position, step, vocab id)."""
    dev = pos.device
    h = _row_stream(seed.to(dev), key.to(dev), pos, step.to(dev))  # (B, S)
    v = torch.arange(vocab, device=dev, dtype=torch.int64) * 0x27D4EB2F & _M32
    u = _mix32(h[..., None] ^ v)  # (B, S, V)
    u = (u.double() + 0.5) / 4294967296.0  # strictly inside (0, 1)
    return (-torch.log(-torch.log(u))).float()


def sampling_floor(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor
) -> Tensor:
    """The sampling filters as one floor per (row, position): a sampled token must have
    logit >= floor (ties at the floor are kept). Returns (B, S) fp32, -inf where nothing is filtered.

    logits (B, S, V) fp32 with excluded ids already -inf (never eligible: their score stays -inf);
    temperature (B,) (<= 0: greedy, no filter); top_k (B,) int (0: off), top_p (B,) (1: off),
    min_p (B,) (0: off). With q = softmax(logits / T):

    1. top_k = k: floor = the k-th largest logit (k >= V: no effect);
    2. top_p = p: over q restricted to the tokens kept so far and renormalised, sorted by
       descending probability, a token is kept while the mass of the tokens before it is < p (so
       at least one); floor = the smallest kept logit;
    3. min_p = m: keep q_v >= m * max(q), i.e. floor = max(floor, max logit + T * log(m)).

    Only the rows with a filter on are computed; a sort (full, or `topk` when every top-p row
    also has a top-k) only when some row has top_p < 1. The filter tensors are read on the host
    to decide that: pass them as CPU tensors (the engine does) so that nothing waits on the device.
    """
    B, S, V = logits.shape
    dev = logits.device
    floor = torch.full((B, S), -float("inf"), dtype=torch.float32, device=dev)
    k_h = top_k.detach().to("cpu", torch.int64)
    p_h = top_p.detach().to("cpu", torch.float64)
    m_h = min_p.detach().to("cpu", torch.float64)
    use_k, use_p, use_m = (k_h > 0) & (k_h < V), p_h < 1, m_h > 0
    rows = (use_k | use_p | use_m).nonzero()[:, 0]
    if not len(rows) or not V:
        return floor
    every = len(rows) == B
    idx = rows.to(dev)
    x = logits.float() if every else logits.float().index_select(0, idx)  # (R, S, V)
    R = x.shape[0]
    t = temperature.to(device=dev, dtype=torch.float32)
    t = t if every else t.index_select(0, idx)
    t_safe = torch.where(t > 0, t, torch.ones_like(t))[:, None]  # (R, 1)
    k, p, m = k_h[rows], p_h[rows], m_h[rows]
    uk, up, um = use_k[rows], use_p[rows], use_m[rows]
    f = torch.full((R, S), -float("inf"), dtype=torch.float32, device=dev)
    top = None  # the largest logit per position
    if bool(uk.any()) or bool(up.any()):
        full = bool((up & ~uk).any())  # a nucleus over the whole vocabulary
        width = V if full else int(k[uk].max())
        # sorted values only (which of equal logits comes first changes nothing below)
        vals = x.sort(-1, descending=True).values if width == V else x.topk(width, -1).values
        top = vals[..., 0]
        if bool(uk.any()):
            kk = torch.where(uk, k - 1, 0).clamp(max=width - 1).to(dev)
            kth = vals.gather(-1, kk[:, None, None].expand(R, S, 1))[..., 0]
            f = torch.where(uk.to(dev)[:, None], kth, f)
        if bool(up.any()):
            f = torch.where(up.to(dev)[:, None], _nucleus_floor(x, vals, f, t_safe, p.to(dev), full), f)
    if bool(um.any()):
        if top is None:
            top = x.amax(-1)
        logm = torch.log(m.to(device=dev, dtype=torch.float32))[:, None]  # -inf where off
        f = torch.where(um.to(dev)[:, None], torch.maximum(f, top + t_safe * logm), f)
    f = torch.where(t[:, None] > 0, f, torch.full_like(f, -float("inf")))
    if every:
        return f
    return floor.index_copy_(0, idx, f)


def _nucleus_floor(x: Tensor, vals: Tensor, kfloor: Tensor, t: Tensor, p: Tensor, full: bool) -> Tensor:
    """top-p's floor over the tokens with logit >= kfloor (top-k's, -inf without it).

    x (R, S, V) the logits; vals (R, S, W) their W largest, descending (W = V when `full`, else
    W >= every top-k row's k, so all the kept tokens but extra ties at kfloor lie in it); t (R, 1)
    > 0; p (R,). Probabilities in fp64 (a cumulative sum over up to V terms)."""
    s = (vals / t[..., None]).double()  # the kernel's logits / T, then fp64
    s0 = s[..., :1]
    s0 = torch.where(torch.isfinite(s0), s0, torch.zeros_like(s0))  # a row of -inf: all weights 0
    kept = vals >= kfloor[..., None]  # restricted to top-k's tokens (a prefix of the sorted order)
    e = torch.where(kept, torch.exp(s - s0), torch.zeros_like(s))  # (R, S, W)
    z = e.sum(-1)
    if not full:  # ties at the k-th logit beyond the window: each has the k-th's weight
        extra = (x >= kfloor[..., None]).sum(-1) - kept.sum(-1)
        kth_w = torch.exp((kfloor / t).double() - s0[..., 0])
        z = z + torch.where(extra > 0, extra * kth_w, torch.zeros_like(z))
    q = e / torch.where(z > 0, z, torch.ones_like(z))[..., None]
    before = torch.cat([torch.zeros_like(q[..., :1]), torch.cumsum(q[..., :-1], -1)], -1)  # mass before each
    n = (kept & (before < p[:, None, None])).sum(-1).clamp(min=1)  # a prefix: count = its length
    return vals.gather(-1, (n - 1)[..., None])[..., 0]


def choose_ref(
    logits: Tensor, temperature: Tensor, seed: Tensor, key: Tensor, pos: Tensor, step: Tensor,
    floor: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token choice and confidence in plain torch: the CPU path and the spec of the fused kernel.

    logits (B, S, V) fp32 with excluded ids already -inf; temperature (B,) (<= 0: greedy); seed,
    key, step (B,) int64; pos (B, S) int64; floor (B, S) or None (`sampling_floor`): in sampled
    rows, tokens with logit < floor score -inf. Returns (pred (B, S) int64, conf (B, S) fp32);
    conf is over the unfiltered logits.
    """
    greedy = temperature <= 0  # (B,)
    scores = logits
    if not bool(greedy.all()):
        t = torch.where(greedy, torch.ones_like(temperature), temperature).to(logits)[:, None, None]
        noisy = logits / t + gumbel(seed, key, pos, step, logits.shape[-1])
        if floor is not None:
            noisy = torch.where(logits < floor.to(logits)[..., None], -float("inf"), noisy)
        scores = torch.where(greedy[:, None, None].to(logits.device), logits, noisy)
    pred = scores.argmax(-1)  # (B, S)
    conf = torch.softmax(logits, dim=-1).gather(-1, pred[..., None])[..., 0]
    return pred, conf


def confidence_ref(
    logits: Tensor, temperature: Tensor, seed: Tensor, key: Tensor, pos: Tensor, step: Tensor,
    mask_id: int | None = None, floor: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The kernel's torch twin: `choose_ref` after excluding `mask_id` (never proposed, no mass)."""
    if mask_id is not None:
        logits = logits.clone()
        logits[..., mask_id] = -float("inf")
    return choose_ref(logits, temperature, seed, key, pos, step, floor)


# -- Triton -------------------------------------------------------------------------------------------


# Filled by _kernels(). Triton looks a kernel's names up in its module's globals (the interpreter
# re-executes the source there), so the jitted functions and `tl` are bound at module level.
tl: Any = None
mix32 = row_stream = noise = None


@functools.cache
def _kernels():
    """Build the Triton kernels on first use (the dispatch imports triton; TRITON_INTERPRET is read here)."""
    global tl, mix32, row_stream, noise
    triton, tl = load_triton()

    @triton.jit
    def mix32(x):
        # murmur3's finaliser; uint32 products wrap mod 2^32 like _mix32's masked int64 ones
        x = x ^ (x >> 16)
        x = x * 0x85EBCA6B
        x = x ^ (x >> 13)
        x = x * 0xC2B2AE35
        return x ^ (x >> 16)

    @triton.jit
    def row_stream(seed_ptr, key_ptr, step_ptr, pos_ptr, b, s, stride_pb, stride_ps):
        # _row_stream (torch, above) for one (row, position); int64 -> uint32 keeps the low 32 bits
        k = tl.load(key_ptr + b)
        h = mix32(tl.load(seed_ptr + b).to(tl.uint32) ^ 0x9E3779B9)
        h = mix32(h ^ k.to(tl.uint32))
        h = mix32(h ^ (k >> 32).to(tl.uint32))
        h = mix32(h ^ tl.load(step_ptr + b).to(tl.uint32))
        return mix32(h ^ tl.load(pos_ptr + b * stride_pb + s * stride_ps).to(tl.uint32))

    @triton.jit
    def noise(h, offs):
        # Gumbel(0, 1) for vocab ids `offs` of stream h: fp64 like gumbel (torch, above), one rounding to fp32
        u = mix32(h ^ (offs.to(tl.uint32) * 0x27D4EB2F))
        u = (u.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # / 2^32, exact
        return (-tl.log(-tl.log(u))).to(tl.float32)

    @triton.jit
    def confidence_kernel(
        logits_ptr, temp_ptr, seed_ptr, key_ptr, pos_ptr, step_ptr, pred_ptr, conf_ptr, floor_ptr,
        S, V, mask_id, stride_lb, stride_ls, stride_pb, stride_ps,
        HAS_MASK: tl.constexpr, HAS_FLOOR: tl.constexpr, BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        s = tl.program_id(1)
        row = logits_ptr + b.to(tl.int64) * stride_lb + s.to(tl.int64) * stride_ls
        temp = tl.load(temp_ptr + b)
        sampled = temp > 0
        h = row_stream(seed_ptr, key_ptr, step_ptr, pos_ptr, b, s, stride_pb, stride_ps)
        if HAS_FLOOR:  # the sampling filters' floor (contiguous (B, S)); a sampled score only
            fl = tl.load(floor_ptr + b.to(tl.int64) * S + s)
        lanes = tl.arange(0, BLOCK)
        m = -float("inf")  # running max of the logits
        z = 0.0  # running sum of exp(logit - m)
        best = -float("inf")  # best score so far and its vocab index (first maximum wins)
        best_i = 0
        for start in range(0, V, BLOCK):
            offs = start + lanes
            x = tl.load(row + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
            if HAS_MASK:
                x = tl.where(offs == mask_id, -float("inf"), x)
            tile_m = tl.max(x, axis=0)
            m_new = tl.maximum(m, tile_m)
            # all -inf so far: nothing to rescale (avoids exp(-inf - -inf) = nan)
            safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            z = z * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), axis=0)
            m = m_new
            if sampled:
                score = tl.math.div_rn(x, temp) + noise(h, offs)  # IEEE division, as torch's
                if HAS_FLOOR:
                    score = tl.where(x < fl, -float("inf"), score)
                tile_best = tl.max(score, axis=0)
            else:
                score = x
                tile_best = tile_m
            tile_i = tl.min(tl.where(score == tile_best, offs, V), axis=0)  # lowest index of the max
            take = tile_best > best  # strict: an earlier tile keeps a tie
            best_i = tl.where(take, tile_i, best_i)
            best = tl.where(take, tile_best, best)
        logit = tl.load(row + best_i).to(tl.float32)
        if HAS_MASK:
            logit = tl.where(best_i == mask_id, -float("inf"), logit)
        out = b.to(tl.int64) * S + s
        tl.store(pred_ptr + out, best_i.to(tl.int64))
        tl.store(conf_ptr + out, tl.math.div_rn(tl.exp(logit - m), z))

    @triton.jit
    def gumbel_kernel(seed_ptr, key_ptr, pos_ptr, step_ptr, out_ptr, S, V, stride_pb, stride_ps,
                      BLOCK: tl.constexpr):
        b = tl.program_id(0)
        s = tl.program_id(1)
        h = row_stream(seed_ptr, key_ptr, step_ptr, pos_ptr, b, s, stride_pb, stride_ps)
        base = out_ptr + (b.to(tl.int64) * S + s) * V
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(base + offs, noise(h, offs), mask=offs < V)

    return confidence_kernel, gumbel_kernel


def _block(V: int) -> int:
    return min(4096, max(16, 1 << (V - 1).bit_length()))


def _row_args(seed: Tensor, key: Tensor, step: Tensor, pos: Tensor, dev: torch.device) -> tuple[Tensor, ...]:
    return tuple(t.to(device=dev, dtype=torch.int64).contiguous() for t in (seed, key, step, pos))


def confidence_triton(
    logits: Tensor, temperature: Tensor, seed: Tensor, key: Tensor, pos: Tensor, step: Tensor,
    mask_id: int | None = None, block: int | None = None, floor: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`confidence_ref` as one fused Triton kernel: one program per (row, position), V in tiles of
    `block` (a power of two; default: V rounded up, at most 4096). floor (B, S) or None: see
    `choose_ref` (None compiles the kernel without it)."""
    kernel = _kernels()[0]
    Bsz, S, V = logits.shape
    dev = logits.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    seed, key, step, pos = _row_args(seed, key, step, pos, dev)
    temp = temperature.to(device=dev, dtype=torch.float32).contiguous()
    pred = torch.empty(Bsz, S, dtype=torch.int64, device=dev)
    conf = torch.empty(Bsz, S, dtype=torch.float32, device=dev)
    if floor is not None:
        floor = floor.to(device=dev, dtype=torch.float32).contiguous()
    if pred.numel():
        kernel[(Bsz, S)](
            logits, temp, seed, key, pos, step, pred, conf, conf if floor is None else floor,
            S, V, -1 if mask_id is None else int(mask_id),
            logits.stride(0), logits.stride(1), pos.stride(0), pos.stride(1),
            HAS_MASK=mask_id is not None, HAS_FLOOR=floor is not None, BLOCK=block or _block(V), num_warps=8,
        )
    return pred, conf


def gumbel_triton(seed: Tensor, key: Tensor, pos: Tensor, step: Tensor, vocab: int) -> Tensor:
    """The kernel's noise written out (B, S, V) fp32: the twin of `gumbel` (tests)."""
    _, kernel = _kernels()
    dev = pos.device
    seed, key, step, pos = _row_args(seed, key, step, pos, dev)
    Bsz, S = pos.shape
    out = torch.empty(Bsz, S, vocab, dtype=torch.float32, device=dev)
    if out.numel():
        kernel[(Bsz, S)](seed, key, pos, step, out, S, vocab, pos.stride(0), pos.stride(1), BLOCK=_block(vocab))
    return out
