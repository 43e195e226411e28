"""A compact set of the ids a reader has seen (to reject duplicates): 16 bytes per id, not a str.

An input of tens of millions of rows must not need gigabytes to remember its ids. `IdSet` keeps a
128-bit blake2b digest per id: recent ones in a small Python set, the rest in one sorted array of
16-byte digests (compared as bytes), into which the recent ones are inserted when they outgrow a
sixteenth of it. A duplicate is reported when all 128 bits match: two different ids collide with
probability about n^2 / 2^129 (for 10^8 ids, ~10^-23), so no row is ever rejected for another
row's id in practice, and none is ever accepted twice.
"""

from __future__ import annotations

import hashlib

import numpy as np

_PERSON = b"twotower-seen"
_MIN_RECENT = 1 << 12
_D = np.dtype("V16")  # a digest's 16 bytes, compared as bytes (so sorted by the digest's value)


def _digest(row_id: str) -> bytes:
    return hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=16, person=_PERSON).digest()


class IdSet:
    def __init__(self) -> None:
        self._recent: set[bytes] = set()
        self._sorted = np.empty(0, dtype=_D)

    def add(self, row_id: str) -> bool:
        """Add an id; False if it was already there."""
        h = _digest(row_id)
        if h in self._recent or self._in_sorted(h):
            return False
        self._recent.add(h)
        if len(self._recent) >= max(_MIN_RECENT, len(self._sorted) // 16):
            self._merge()
        return True

    def __contains__(self, row_id: object) -> bool:
        if not isinstance(row_id, str):
            return False
        h = _digest(row_id)
        return h in self._recent or self._in_sorted(h)

    def __len__(self) -> int:
        return len(self._recent) + len(self._sorted)

    @property
    def nbytes(self) -> int:
        """Memory of the sorted part (the recent ids add ~100 bytes each, at most 1/16 of them)."""
        return self._sorted.nbytes

    def _in_sorted(self, h: bytes) -> bool:
        a = self._sorted
        if not len(a):
            return False
        key = np.frombuffer(h, dtype=_D)
        i = int(np.searchsorted(a, key[0]))
        return i < len(a) and a[i] == key[0]

    def _merge(self) -> None:
        """Insert the recent digests into the sorted array: one copy of it (a merge's peak is
        twice the array, never a sort of it)."""
        new = np.frombuffer(b"".join(sorted(self._recent)), dtype=_D)
        at = np.searchsorted(self._sorted, new)
        self._sorted = np.insert(self._sorted, at, new)
        self._recent = set()
