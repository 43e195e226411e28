"""Durable output: shards committed by rename (Parquet, or JSON lines), and the errors sidecar.

A shard is written under a temporary name (`.part-NNNNN.parquet.tmp`: a leading dot, and not
ending in .parquet, so no loader ever sees it), closed, fsynced, renamed to its final name
(`part-NNNNN.parquet`) and the directory fsynced. The rename is the commit point: a committed
shard is a complete file that survives power loss, and anything not yet renamed is disposable
(its rows are not done and will be regenerated). A `jsonl` or `openai` shard (io.formats) is the
same: `.part-NNNNN.jsonl.tmp`, fsynced, renamed to `part-NNNNN.jsonl`.

The writer owns no names: it is given them (`ShardNames`, in practice io.rundir's `Layout` of the
run or of one partition task), so the directory's naming lives in one place.

A write that fails for a reason the user can fix (disk full, file-size limit, read-only or
unwritable directory) raises io.durable.RunDirError naming the file (one line, exit 2); the open
shard is dropped, the committed ones are kept. Parquet shards carry page checksums, so that a
resume can verify every page of a shard it adopts (io.rundir).

Rows are keyed by (id, sample_index), spelled io.schema.sample_key (the id itself for sample 0).

Neither class is thread-safe or reentrant. In particular do not call `flush()` from inside a
signal handler that may interrupt `add()`: set a flag there and flush from the main loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .durable import fsync_dir, fsync_path, writing
from .formats import LINE_FORMATS, check_format, encode_line
from .schema import RejectedRow, check_record, output_schema, sample_key


class ShardNames(Protocol):
    """The names a ShardWriter writes under (io.rundir.Layout is one)."""

    def shard(self, index: int) -> str:
        """The committed name of shard `index`."""

    def tmp(self, name: str) -> str:
        """The name a file is written under until it is renamed to `name`."""


class KeySet(Container[str], Protocol):
    """The committed row keys a writer refuses and adds to (a set, or io.rundir.DoneSet)."""

    def update(self, keys: Sequence[str]) -> None: ...


@dataclass(frozen=True)
class ShardInfo:
    """A committed shard, as passed to the `on_commit` callback. `keys`: its rows' keys
    (io.schema.sample_key: the id for sample 0), in the order written."""

    name: str
    index: int
    rows: int
    bytes: int
    keys: list[str]

    @property
    def ids(self) -> list[str]:
        """The row keys (the ids, for a run without samples); an alias of `keys`."""
        return self.keys


def describe_key(key: str) -> str:
    """A row key for a message: `id 'x'`, or `id 'x' sample 2`."""
    row_id, _, k = key.partition("\x00")
    return f"id {row_id!r}" + (f" sample {k}" if k else "")


class _ParquetShard:
    """An open Parquet shard file: zstd, one row group per write, page checksums. Also what
    io.rundir rewrites a shard with (RunDir.retract), so every shard has the same settings."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        self._w = pq.ParquetWriter(path, schema, compression="zstd", write_page_checksum=True)

    def write(self, rows: list[Any]) -> None:
        self._w.write_table(pa.Table.from_pylist(rows, schema=self.schema), row_group_size=len(rows))

    def write_table(self, table: pa.Table) -> None:
        """One row group of rows already in this shard's schema (io.rundir's rewrite of a shard)."""
        self._w.write_table(table, row_group_size=table.num_rows)

    def commit(self) -> None:
        self._w.close()
        fsync_path(self.path)

    def discard(self) -> None:
        with contextlib.suppress(Exception):  # already failing; the file is removed by the caller
            self._w.close()


class _LinesShard:
    """An open JSON-lines shard file (its rows arrive already encoded, one line each)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 - owned until commit/discard

    def write(self, rows: list[Any]) -> None:
        self._f.write(b"".join(rows))

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()


class ShardWriter:
    """Streams validated records into size-bounded shards: Parquet (zstd, several row groups), or
    JSON lines of format `fmt` ("jsonl" or "openai", io.formats).

    Shard `i` is committed as `names.shard(i)`, written as `names.tmp(names.shard(i))` until then.
    Memory is one row group of records plus the keys of the open shard. Records are checked with
    io.schema.check_record against the pass-through columns `extra` (the Parquet schema is
    `output_schema(schema_meta, extra)`), and for a line format encoded, at `add()`, so a bad record
    is refused alone. `done` (optional) is the set of row keys already committed: adding one of
    them, or a key already in the open shard, raises ValueError, so a pipeline bug can never write
    a row twice. Committed keys are added to it. `on_commit(ShardInfo)` runs after each shard is
    durably renamed (RunDir records it there).
    """

    def __init__(
        self,
        out_dir: str | Path,
        schema_meta: dict[str, str] | None = None,
        rows_per_shard: int = 10_000,
        row_group_rows: int = 1_000,
        *,
        names: ShardNames,
        start_index: int = 0,
        done: KeySet | None = None,
        on_commit: Callable[[ShardInfo], None] | None = None,
        fmt: str = "parquet",
        extra: Sequence[pa.Field] = (),
    ):
        if rows_per_shard < 1 or row_group_rows < 1:
            raise ValueError("rows_per_shard and row_group_rows must be positive")
        self.out_dir = Path(out_dir)
        self.fmt = check_format(fmt)
        self.extra = list(extra)
        self.schema = output_schema(schema_meta, self.extra)
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = min(row_group_rows, rows_per_shard)
        self.next_index = start_index
        self.names = names
        self.done: KeySet = done if done is not None else set()
        self.on_commit = on_commit
        self.committed: list[ShardInfo] = []
        self._file: _ParquetShard | _LinesShard | None = None
        self._tmp: Path | None = None
        self._buffer: list[Any] = []  # records (Parquet) or encoded lines
        self._shard_keys: list[str] = []
        self._pending: set[str] = set()
        self._broken = False
        self._closed = False

    # ---- public ---------------------------------------------------------------------------------
    def add(self, record: dict[str, Any]) -> None:
        """Validate and buffer one record; commits the shard when it reaches rows_per_shard."""
        if self._closed or self._broken:
            raise RuntimeError("ShardWriter is closed" if self._closed else "ShardWriter failed earlier")
        rec = check_record(record, self.extra)
        key = sample_key(rec["id"], rec["sample_index"])
        if key in self.done or key in self._pending:
            raise ValueError(f"{describe_key(key)} was already written")
        row = encode_line(rec, self.fmt) if self.fmt in LINE_FORMATS else rec
        self._buffer.append(row)
        self._shard_keys.append(key)
        self._pending.add(key)
        if len(self._buffer) >= self.row_group_rows:
            self._write_row_group()
        if len(self._shard_keys) >= self.rows_per_shard:
            self.flush()

    def is_pending(self, key: str) -> bool:
        """Written to the open (uncommitted) shard: done for this process, lost if it crashes.
        `key`: io.schema.sample_key(id, sample_index)."""
        return key in self._pending

    @property
    def failed(self) -> bool:
        """A write failed (e.g. disk full): the open shard was dropped and the writer refuses more."""
        return self._broken

    @property
    def pending_rows(self) -> int:
        return len(self._shard_keys)

    def flush(self) -> ShardInfo | None:
        """Commit the open shard now, however small (used at the end and on SIGTERM)."""
        if self._broken:
            raise RuntimeError("ShardWriter failed earlier; its open shard was discarded")
        if not self._shard_keys:
            return None
        try:
            self._write_row_group()
            return self._commit()
        except BaseException:
            self.abort()
            raise

    def write_empty_shard(self) -> ShardInfo:
        """Commit a shard with zero rows, so a run with no output still loads with every reader."""
        if self._shard_keys:
            raise RuntimeError("write_empty_shard with rows pending")
        try:
            self._open()
            return self._commit()
        except BaseException:
            self.abort()
            raise

    def close(self) -> None:
        """Commit what is buffered and stop. Idempotent."""
        if self._closed:
            return
        if not self._broken:
            self.flush()
        self._closed = True

    def abort(self) -> None:
        """Drop the open shard without committing it (its rows stay not-done)."""
        self._broken = True
        if self._file is not None:
            self._file.discard()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        self._buffer.clear()
        self._pending.difference_update(self._shard_keys)
        self._shard_keys.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # Even on an exception the buffered records are complete, validated rows: keep them.
        if self._broken:
            self._closed = True
        else:
            self.close()

    # ---- internals ------------------------------------------------------------------------------
    def _open(self) -> None:
        name = self.names.shard(self.next_index)
        self._tmp = self.out_dir / self.names.tmp(name)
        with writing(self._tmp):
            if self.fmt in LINE_FORMATS:
                self._file = _LinesShard(self._tmp)
            else:
                self._file = _ParquetShard(self._tmp, self.schema)

    def _write_row_group(self) -> None:
        if not self._buffer:
            return
        try:
            if self._file is None:
                self._open()
            with writing(self._tmp):
                self._file.write(self._buffer)
        except BaseException:
            self.abort()
            raise
        self._buffer.clear()

    def _commit(self) -> ShardInfo:
        assert self._file is not None and self._tmp is not None
        with writing(self._tmp):
            self._file.commit()
            self._file = None
        name = self.names.shard(self.next_index)
        final = self.out_dir / name
        with writing(final):
            os.replace(self._tmp, final)  # the commit point
            self._tmp = None
            fsync_dir(self.out_dir)
        info = ShardInfo(name, self.next_index, len(self._shard_keys), final.stat().st_size, self._shard_keys)
        self.next_index += 1
        self.done.update(self._shard_keys)
        self._pending.clear()
        self._shard_keys = []
        self.committed.append(info)
        if self.on_commit is not None:
            self.on_commit(info)
        return info


class ErrorLog:
    """An append-only errors file (`.errors.jsonl`, named by io.rundir): one JSON object per
    rejected row, deduplicated across resumes by content, never by line number.

    Durability: each line is written with one write() call and flushed to the OS at once (so
    `tail -f` sees it); fsync happens in `sync()`, which RunDir calls at every shard commit and at
    close. A line lost in a crash before its fsync is not lost data: rejection is deterministic, so
    the resumed run re-reads the row, rejects it again and writes the line then. A torn last line
    is cut off on open (before anything is appended after it) and skipped by `read_errors`.

    Dedup key: the record's content (id, reason, raw excerpt: `content_key`) and its occurrence,
    so that inserting or reordering input lines logs nothing again. The file is a multiset: the
    k-th distinct input row with a given content in this run (distinct rows: distinct line
    numbers, so the same row delivered twice, e.g. by a retried Ray task, counts once) is logged
    only if the file does not already hold k+1 records of that content. `count` is the number of
    records in the file. Any JSON object of any shape in the file is counted (a hand-edited
    record never raises).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._logged: dict[bytes, int] = {}  # content key -> records of it in the file
        self._seen: dict[bytes, dict[Any, int]] = {}  # content key -> {line_no: occurrence} this run
        self._rows: set[bytes] = set()  # row_key(id, raw) of the records logged with an id
        self.count = 0
        with writing(self.path):
            if self.path.exists():
                _truncate_torn_tail(self.path)
                for rec in read_errors(self.path):
                    k = content_key(rec)
                    self._logged[k] = self._logged.get(k, 0) + 1
                    if isinstance(rec.get("id"), str):
                        self._rows.add(row_key(rec["id"], rec.get("raw") or ""))
                    self.count += 1
            self._f = open(self.path, "ab")  # noqa: SIM115 - owned for the log's lifetime
        self._dirty = False

    def add(self, row: RejectedRow) -> bool:
        """Log a rejected row unless it is already logged. Returns True if a line was written."""
        rec = row.to_dict()
        key = content_key(rec)
        seen = self._seen.setdefault(key, {})
        k = seen.setdefault(rec.get("line_no"), len(seen))
        if k < self._logged.get(key, 0):
            return False
        with writing(self.path):
            self._f.write(orjson.dumps(rec) + b"\n")
            self._f.flush()
        self._logged[key] = self._logged.get(key, 0) + 1
        if row.id is not None:
            self._rows.add(row_key(row.id, row.raw or ""))
        self.count += 1
        self._dirty = True
        return True

    def was_rejected(self, row_id: str, excerpt: str) -> bool:
        """A row with id `row_id` and prompt excerpt `excerpt` is logged as rejected (a record
        without an excerpt matches on the id alone)."""
        return row_key(row_id, excerpt) in self._rows or row_key(row_id, "") in self._rows

    def sync(self) -> None:
        if self._dirty and not self._f.closed:
            with writing(self.path):
                os.fsync(self._f.fileno())
            self._dirty = False

    def close(self) -> None:
        if not self._f.closed:
            try:
                self.sync()
            finally:
                self._f.close()


def content_key(rec: dict[str, Any]) -> bytes:
    """What identifies a rejected row across runs: its id, reason and raw excerpt (any JSON)."""
    data = orjson.dumps([rec.get("id"), rec.get("reason"), rec.get("raw")], default=str)
    return hashlib.blake2b(data, digest_size=16).digest()


def row_key(row_id: str, raw: Any) -> bytes:
    return hashlib.blake2b(orjson.dumps([row_id, raw], default=str), digest_size=16).digest()


def count_errors(path: str | Path) -> int:
    """The records of an errors file (each is one rejected row: ErrorLog deduplicates on write)."""
    return sum(1 for _ in read_errors(path))


def _truncate_torn_tail(path: Path) -> None:
    """Cut an unterminated last line (a write torn by a crash) so the next append starts clean."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        pos, chunk = size, 4096
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            nl = buf.rfind(b"\n")
            if nl >= 0:
                end = start + nl + 1
                break
            pos = start
        else:
            end = 0
        if end != size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


def read_errors(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of an errors.jsonl, skipping a torn or otherwise unparsable line."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, "rb") as f:
        for line in f:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec
