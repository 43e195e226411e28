"""What goes into the engine and what comes out of it. No tensors, no files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ..config import DecodeParams


def row_key(row_id: str) -> int:
    """A stable 63-bit integer for a row id: keys the row's sampling noise (never Python's hash())."""
    return int.from_bytes(hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest(), "little") >> 1


@dataclass
class Request:
    """One prompt to decode. `prompt_ids` are token ids (the batcher tokenized them)."""

    id: str
    prompt_ids: list[int]
    params: DecodeParams = field(default_factory=DecodeParams)
    meta: Any = None  # carried through untouched (the pipeline's row payload)

    @property
    def key(self) -> int:
        return row_key(self.id)


@dataclass
class Result:
    """A finished row. `tokens` is the completion, cut after the first EOS (the EOS is kept)."""

    id: str
    tokens: list[int]
    stats: dict[str, Any]
    meta: Any = None
