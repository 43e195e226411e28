"""Which kernel path runs, and the one place that imports triton (DESIGN.md principle 5).

This module only *looks* for triton at import (`importlib.util.find_spec`, cheap and safe without
a GPU); the import itself happens on first use, in `load_triton()`, which the kernel modules call
when they build their Triton kernels.

`backend(device)`: `auto` (default) is Triton for CUDA tensors when triton is installed, the torch
ref otherwise; `ref` is always the torch ref; `triton` is always Triton and raises
`KernelUnavailable` if that is impossible (triton missing, or a CPU tensor without
`TRITON_INTERPRET=1`, which the interpreter tests use on CPU). The choice comes from `force(...)` (a
context manager for tests) or else the environment variable `TWOTOWER_KERNELS=auto|ref|triton`.
"""


from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

MODES = ("auto", "ref", "triton")
ENV = "TWOTOWER_KERNELS"

# The token-by-token Triton scan is meant for the denoiser's short blocks (S = 16 by default);
# longer sequences (prefill) keep the chunked torch scan, whose work is parallel over the chunk.
BLOCK_SCAN_MAX = 64


def _found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAS_CUDA: bool = torch.cuda.is_available()
HAS_TRITON: bool = _found("triton")


class KernelUnavailable(RuntimeError):
    """A kernel path was asked for explicitly but cannot run here."""


_forced: str | None = None


def requested() -> str:
    """The mode asked for: `force(...)` if active, else $TWOTOWER_KERNELS, else 'auto'."""
    mode = _forced or os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


@contextmanager
def force(mode: str) -> Iterator[None]:
    """Select a path for the duration of a `with` block (tests): 'ref', 'triton' or 'auto'."""
    global _forced
    if mode not in MODES:
        raise ValueError(f"force({mode!r}): expected one of {', '.join(MODES)}")
    previous, _forced = _forced, mode
    try:
        yield
    finally:
        _forced = previous


def interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (it must be set before kernels are built)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _triton_blocker(device: torch.device) -> str | None:
    """Why Triton cannot run on `device`, or None when it can."""
    if not HAS_TRITON:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if interpreting() else "CPU tensors need TRITON_INTERPRET=1 (set before importing triton)"
    return f"no Triton path for {device.type} tensors"


def backend(device: torch.device | str) -> str:
    """'triton' or 'ref': the path a kernel call on tensors of `device` takes now."""
    mode = requested()
    if mode == "ref":
        return "ref"
    device = torch.device(device)
    blocker = _triton_blocker(device)
    if mode == "triton":
        if blocker:
            raise KernelUnavailable(f"Triton kernels were forced but {blocker}")
        return "triton"
    return "triton" if blocker is None and device.type == "cuda" else "ref"


_triton_modules: tuple[Any, Any] | None = None


def load_triton() -> tuple[Any, Any]:
    """(triton, triton.language), imported on first use."""
    global _triton_modules
    if _triton_modules is None:
        if not HAS_TRITON:
            raise KernelUnavailable("triton is not installed (pip install 'twotower-cli[gpu]')")
        _triton_modules = (importlib.import_module("triton"), importlib.import_module("triton.language"))
    return _triton_modules


