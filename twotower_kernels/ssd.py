"""Seeded Mamba-2 block scan for the denoiser's short blocks (SPEC.md §3), Triton + `ssd_ref`.

The denoiser scans each block of S tokens (16 by default) left to right starting from the context
tower's SSM state. Over so few tokens the plain recurrence is the right algorithm: one program per
(row, head, slice of head_dim) keeps its (P, N) slice of the fp32 state in registers and walks the
tokens, so the block costs one launch, and no chunked kernel sits between the seeded state and
the block (the case SPEC.md §3 warns about).

    state = exp(dt*A) * state + dt * outer(x, B);  y = state · C      (no D skip term)

Shapes: x (B, n, nh, P), dt (B, n, nh), A (nh,),
Bm/Cm (B, n, nh, N) already expanded to heads, state (B, nh, P, N); all fp32.
The kernel agrees with the ref to rounding (it may fuse multiply-adds and sums C·state in another
order; Triton's exp is a fast approximation on GPU): tests hold it to 1e-5.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .dispatch import load_triton


def ssd_ref(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence token by token (the spec). Returns (y (B, n, nh, P), final state (B, nh, P, N))."""
    ys = []
    for i in range(x.shape[1]):
        decay = torch.exp(dt[:, i] * A)  # (B, nh)
        state = state * decay[:, :, None, None] + (dt[:, i, :, None] * x[:, i])[..., None] * Bm[:, i, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Cm[:, i]))
    if not ys:
        return x.new_zeros(x.shape), state
    return torch.stack(ys, 1), state


# -- Triton -------------------------------------------------------------------------------------------

tl: Any = None  # bound by _kernels(): Triton resolves a kernel's names in its module's globals


@functools.cache
def _kernels():
    global tl
    triton, tl = load_triton()

    @triton.jit
    def ssd_kernel(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, s_ptr, y_ptr, out_ptr,
        n, nh, P, N,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)  # this program's head_dim slice
        k = tl.arange(0, BLOCK_N)
        mp = p < P
        mk = k < N
        pk = p[:, None] * N + k[None, :]  # (BLOCK_P, BLOCK_N) offsets inside one (P, N) state
        mpk = mp[:, None] & mk[None, :]
        head = (b * nh + h) * P * N
        state = tl.load(s_ptr + head + pk, mask=mpk, other=0.0)
        a = tl.load(A_ptr + h)
        for i in range(0, n):
            tok = b * n + i  # (row, token) index into the (B, n, ...) inputs
            dt = tl.load(dt_ptr + tok * nh + h)
            xv = tl.load(x_ptr + (tok * nh + h) * P + p, mask=mp, other=0.0)  # (BLOCK_P,)
            bv = tl.load(B_ptr + (tok * nh + h) * N + k, mask=mk, other=0.0)  # (BLOCK_N,)
            cv = tl.load(C_ptr + (tok * nh + h) * N + k, mask=mk, other=0.0)
            state = state * tl.exp(dt * a) + (dt * xv)[:, None] * bv[None, :]
            y = tl.sum(state * cv[None, :], axis=1)  # (BLOCK_P,)
            tl.store(y_ptr + (tok * nh + h) * P + p, y, mask=mp)
        tl.store(out_ptr + head + pk, state, mask=mpk)

    return ssd_kernel


def ssd_triton(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor, block_p: int | None = None
) -> tuple[Tensor, Tensor]:
    """`ssd_ref` as one Triton launch over (row, head, head_dim slice); fp32 in and out."""
    Bsz, n, nh, P = x.shape
    N = Bm.shape[-1]
    x, dt, A, Bm, Cm, state = (t.float().contiguous() for t in (x, dt, A, Bm, Cm, state))
    y = torch.empty_like(x)
    final = torch.empty_like(state)
    BLOCK_N = max(16, 1 << (N - 1).bit_length())
    # keep the state slice near 4096 fp32 values per program (registers), at least 16 rows of P
    BLOCK_P = block_p or max(16, min(1 << (P - 1).bit_length(), 4096 // BLOCK_N))
    if state.numel():
        grid = (Bsz, nh, _cdiv(P, BLOCK_P))
        _kernels()[grid](x, dt, A, Bm, Cm, state, y, final, n, nh, P, N, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N)
    return y, final


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
