"""Kernel dispatch: the one module that knows about optional accelerators (DESIGN.md principle 5).

Nothing else in the project imports triton. This module only *looks*
for them at import (`importlib.util.find_spec`, cheap and safe without a GPU); the import itself
happens on first use, in `load_triton()`. Each kernel module (`confidence.py`, `ssd.py`) holds a
pure-PyTorch `*_ref` twin, which is the spec and the CPU path, and builds its Triton kernel lazily
through `load_triton()`.

Which path runs (`backend(device)`):

- `auto` (default): Triton for CUDA tensors when triton is installed; the torch ref otherwise.
- `ref`: always the torch ref.
- `triton`: always Triton; raises `KernelUnavailable` if that is impossible (triton missing, or a
  CPU tensor without `TRITON_INTERPRET=1`, the interpreter tests use on CPU).

The choice comes from `force(...)` (a context manager for tests) or else the environment variable
`TWOTOWER_KERNELS=auto|ref|triton`.

mamba_ssm's per-token `selective_state_update` / chunked scan would be a third block-scan path; it
is not used (nor installed by the `gpu` extra): our Triton scan covers the same case in one launch,
and a chunked scan over a seeded short block is what docs/SPEC.md warns about.
"""

from __future__ import annotations

from torch import Tensor

from . import confidence, ssd
from .dispatch import (
    BLOCK_SCAN_MAX,
    ENV,
    HAS_CUDA,
    HAS_TRITON,
    MODES,
    KernelUnavailable,
    backend,
    force,
    interpreting,
    load_triton,
    requested,
)

__all__ = [
    "BLOCK_SCAN_MAX", "ENV", "HAS_CUDA", "HAS_TRITON", "MODES", "KernelUnavailable", "backend",
    "block_scan", "confidence", "force", "interpreting", "load_triton", "propose", "requested", "ssd",
]


# -- the kernels, dispatched (named unlike their modules, which are package attributes) -------------


def propose(
    logits: Tensor, temperature: Tensor, seed: Tensor, key: Tensor, pos: Tensor, step: Tensor,
    mask_id: int | None = None, floor: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Proposed token and its temperature-1 probability per position; see `confidence.confidence_ref`.
    floor (B, S) or None: the sampling filters' floor (`confidence.sampling_floor`)."""
    if backend(logits.device) == "triton":
        return confidence.confidence_triton(logits, temperature, seed, key, pos, step, mask_id, floor=floor)
    return confidence.confidence_ref(logits, temperature, seed, key, pos, step, mask_id, floor)


def block_scan(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Seeded Mamba-2 scan over a short block; see `ssd.ssd_ref` for shapes."""
    fn = ssd.ssd_triton if backend(x.device) == "triton" else ssd.ssd_ref
    return fn(x, dt, A, Bm, Cm, state)
