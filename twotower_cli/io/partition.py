"""Deterministic input partitions for job arrays: `--num-shards N --shard-index I`.

Row r belongs to shard `blake2b(key(r)) mod N`, where key(r) is the row id (explicit or the
reader's content-derived `h-...` id), or `#raw:<reason, excerpt>` for a rejected row that has no id. The hash
is keyed and stable across processes, hosts and Python versions (never Python's `hash()`, which is
salted per process), so N tasks that each read the whole input select disjoint sets whose union is
the input, and a rerun of task I selects exactly the same rows.

Every shard of a partitioned run writes into the same output directory under names tagged with
`s<I>-of-<N>` (see `io.rundir` for the layout), so nothing two tasks write can collide, and
`part-*.parquet` still globs every shard for duckdb, polars and `datasets`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .schema import PromptRow, RejectedRow

_PERSON = b"twotower-shard"  # keys the hash: unrelated to row_key's sampling noise
TAG_RE = re.compile(r"^s(\d{4,})-of-(\d{4,})$")


def shard_of(key: str, num_shards: int) -> int:
    """The shard in [0, num_shards) that owns `key`."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "big") % num_shards


def row_partition_key(row: PromptRow | RejectedRow) -> str:
    """What a row is partitioned by: its id, or for a rejected row without one its content (its
    reason and raw excerpt; not its line number, so that a line inserted above it does not move
    it to another task, which would log it a second time in that task's errors file)."""
    if row.id is not None:
        return row.id
    return "#raw:" + row.reason + "\x00" + row.raw


@dataclass(frozen=True)
class Partition:
    """Shard `index` of `count`. `count == 1` is the whole input (the unpartitioned layout)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"--num-shards must be an integer >= 1, got {self.count!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ValueError(f"--shard-index must be in [0, {self.count - 1}] for --num-shards {self.count}, "
                             f"got {self.index!r}")

    @property
    def tag(self) -> str:
        """`s0003-of-0008`: zero-padded so names sort by shard; wider for N > 10000."""
        w = max(4, len(str(self.count - 1)))
        return f"s{self.index:0{w}d}-of-{self.count:0{w}d}"

    def owns(self, row: PromptRow | RejectedRow) -> bool:
        return self.count == 1 or shard_of(row_partition_key(row), self.count) == self.index


def parse_tag(tag: str) -> Partition | None:
    """`s0003-of-0008` -> Partition(3, 8); None if `tag` is not one."""
    m = TAG_RE.match(tag)
    if not m:
        return None
    try:
        return Partition(int(m.group(1)), int(m.group(2)))
    except ValueError:
        return None


MAX_SHARDS = 1 << 20  # tasks of one job array


def from_flags(num_shards: int | None, shard_index: int | None) -> Partition | None:
    """The CLI's two flags -> a Partition, None for an unpartitioned run. Raises ValueError with
    a one-line message for a bad combination (the CLI exits 2 with it)."""
    if num_shards is None and shard_index is None:
        return None
    if num_shards is None or shard_index is None:
        raise ValueError("--num-shards and --shard-index go together: give both or neither")
    if num_shards > MAX_SHARDS:
        raise ValueError(f"--num-shards must be at most {MAX_SHARDS}, got {num_shards}")
    p = Partition(shard_index, num_shards)
    return None if p.count == 1 else p
