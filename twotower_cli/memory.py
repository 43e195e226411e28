"""Keep a long run's resident memory flat: pin glibc malloc's mmap threshold.

glibc raises its mmap threshold dynamically (up to 32 MiB) each time a large block that was
mmap()ed is freed; after that, tensors of varying sizes (prompts of every length) come from the
heap instead, where freed holes fragment and are rarely returned to the OS. Over 100k prompts of
mixed lengths the resident set then grows by hundreds of MB with no leak behind it. Pinning the
threshold (which also turns the dynamic adjustment off) keeps large tensors in their own mappings,
returned to the OS when freed. A documented glibc tunable (mallopt(3)); a no-op elsewhere, and
skipped when the user set MALLOC_MMAP_THRESHOLD_ themselves or TWOTOWER_MALLOC_PIN=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def pin_malloc_thresholds(mmap_threshold: int = 128 * 1024, trim_threshold: int = 128 * 1024) -> bool:
    """Returns True when glibc accepted the settings."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ \
            or os.environ.get("TWOTOWER_MALLOC_PIN", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
