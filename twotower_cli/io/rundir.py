"""One output directory = one run: its file names, lock, fingerprint, done rows, crash recovery.

This module is the one owner of the directory: every name in it is spelled here (`Layout`, one per
partition task, and the patterns that recognise any layout's files), and the writer (io.writer)
writes under the names it is given. Layout of `out/`:
    part-00000.parquet ...   committed shards: the only visible files, and the source of truth
                             (`part-00000.jsonl` ... for the `jsonl` and `openai` formats, io.formats)
    .manifest.json           fingerprint, shard list, counts (replaced atomically)
    .errors.jsonl            rejected rows (see io.writer.ErrorLog)
    .lock                    flock'ed while a run writes; holds pid/host/start for the message
    .part-00003.parquet.tmp  an uncommitted shard (only while writing, or after a crash)
    .part-00002.parquet.corrupt  an unreadable shard set aside on open (its rows are redone)

Why the sidecars are hidden: `datasets.load_dataset("parquet", data_dir=out)` reads every
non-hidden file of the directory as Parquet (an `errors.jsonl` or `_errors.jsonl` makes it fail),
and `pyarrow.dataset(out)` skips only names starting with "." or "_"; a leading dot satisfies
both. duckdb and polars are pointed at `out/*.parquet` (polars refuses a bare directory that
holds files with other extensions, hidden ones included).

Rows are keyed by (id, sample_index): io.schema.sample_key, the id itself for sample 0. "Done"
everywhere below (the done set, `is_done`, `committed_input`, the writer's refusal) means a key.

Formats. A run writes one format (`format=`, recorded in the manifest as `shard_format`; the run
fingerprint includes it too): Parquet shards, or JSON-lines shards (`jsonl` or `openai` lines,
io.formats). Everything here (commit by rename, recovery, verification, --overwrite, the layouts)
is the same for both; only the shard's extension and how a shard is read differ.

Crash safety. The rename of a shard is its commit; the done set is rebuilt from the committed
shards' `id` and `sample_index` columns, never from a journal that could disagree with them. The
manifest is written first at open (so a directory with shards always has one) and rewritten after
each commit, but it only caches the shard list and counts: a crash between a rename and the
manifest update leaves a committed shard that the next open adopts; a crash before the rename
leaves a .tmp that the next open deletes, and those rows are simply not done.
So a crash at any instant loses no committed row and a resume writes no row twice (the writer
refuses keys in the done set). A shard is adopted only if it reads whole (Parquet: every column of
every row group, page checksums; JSON lines: every line decodes to a valid record, the last one
ends with a newline) with the row count the manifest records for it; otherwise it is moved aside
as `.NAME.corrupt` and its rows are redone.

Retraction (`RunDir.retract`, for --regenerate-changed): committed rows of earlier runs can be
removed so that new versions of them are written. A shard is rewritten without them in place
(its .tmp, then a rename over it), and the manifest holds a `"rewrites": {shard: [old_rows,
new_rows]}` record around the rename, so that recovery accepts the shard with either count
instead of setting it aside; a shard left empty is unlinked once the manifest no longer lists it.
Orphans (`RunDir.orphans`): committed rows whose key no input row of this run asked for.

Partitioned runs (job arrays: `--num-shards N --shard-index I`, see io.partition). Each of the N
tasks writes the same directory under names tagged `s<I>-of-<N>`, so it has its own of everything:

    part-s0003-of-0008-00000.parquet   its shards (`part-*.parquet` globs all tasks' shards; or .jsonl)
    .manifest-s0003-of-0008.json       its manifest, .errors-s0003-of-0008.jsonl its rejects
    .lock-s0003-of-0008                flock'ed for its whole run (a second copy of task I is refused)

A task recovers and resumes from its own shards only (partitions are disjoint, so the union of
N exactly-once tasks is exactly once). The fingerprint gains `num_shards`, and every task checks
its fingerprint against every manifest in the directory, so tasks with another N or other
settings (or an unpartitioned run) are refused; that check-then-write runs under a brief flock
of `.lock`, which an unpartitioned run holds for its whole run, so the two layouts never write
the directory at the same time. A task never touches another task's files, except that
--overwrite removes those of conflicting settings, each under its owner's lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from .durable import RunDirError, atomic_write_bytes, fsync_dir, writing
from .formats import LINE_FORMATS, check_format, line_key, record_from_line, shard_ext
from .partition import Partition
from .reader import row_excerpt
from .schema import (
    META_FINGERPRINT,
    SCHEMA_VERSION,
    PromptRow,
    RejectedRow,
    describe_fields,
    output_schema,
    sample_key,
)
from .writer import ErrorLog, ShardInfo, ShardWriter, _ParquetShard, describe_key

# ---- names ----------------------------------------------------------------------------------------

MANIFEST = ".manifest.json"
ERRORS = ".errors.jsonl"
LOCK = ".lock"
TMP_SUFFIX = ".tmp"
CORRUPT_SUFFIX = ".corrupt"
MANIFEST_FORMAT = "twotower-run"
_TAG = r"s\d{4,}-of-\d{4,}"
SHARD_EXTS = ("parquet", "jsonl")  # io.formats.shard_ext of every format
# Every file of any layout and format: `tag` is None for the unpartitioned one.
ANY_SHARD_RE = re.compile(rf"^part-(?:(?P<tag>{_TAG})-)?(?P<index>\d{{5,}})\.(?P<ext>parquet|jsonl)$")
MANIFEST_RE = re.compile(rf"^\.manifest(?:-(?P<tag>{_TAG}))?\.json$")
ERRORS_RE = re.compile(rf"^\.errors(?:-(?P<tag>{_TAG}))?\.jsonl$")
LOCK_RE = re.compile(rf"^\.lock(?:-(?P<tag>{_TAG}))?$")
OPEN_WAIT_S = 60.0  # how long a partition task waits for another task's brief hold of `.lock`


@dataclass(frozen=True)
class Layout:
    """The names of one layout's files: the unpartitioned run's (`tag` None) or those of one
    partition task (`tag` = `s0003-of-0008`, see io.partition). `ext`: its shards' extension
    (io.formats.shard_ext)."""

    tag: str | None = None
    ext: str = "parquet"

    @property
    def manifest(self) -> str:
        return MANIFEST if self.tag is None else f".manifest-{self.tag}.json"

    @property
    def errors(self) -> str:
        return ERRORS if self.tag is None else f".errors-{self.tag}.jsonl"

    @property
    def lock(self) -> str:
        return LOCK if self.tag is None else f".lock-{self.tag}"

    def shard(self, index: int) -> str:
        return f"part-{index:05d}.{self.ext}" if self.tag is None else f"part-{self.tag}-{index:05d}.{self.ext}"

    @property
    def shard_re(self) -> re.Pattern[str]:
        """This layout's shard names (of its extension); group 1: the index."""
        prefix = "" if self.tag is None else f"{re.escape(self.tag)}-"
        return re.compile(rf"^part-{prefix}(\d{{5,}})\.{re.escape(self.ext)}$")

    @staticmethod
    def tmp(name: str) -> str:
        """`.NAME.tmp`: where NAME is written until its rename commits it."""
        return f".{name}{TMP_SUFFIX}"

    @staticmethod
    def corrupt(name: str) -> str:
        """`.NAME.corrupt`: where an unreadable shard NAME is set aside (no loader reads it)."""
        return f".{name}{CORRUPT_SUFFIX}"


_NOT_OURS = object()


def scope_of(entry: str) -> str | None | object:
    """Which layout a directory entry belongs to: None (unpartitioned), a partition tag, or
    _NOT_OURS. A temporary or set-aside file (`.NAME.tmp`, `.NAME.corrupt`) belongs to NAME's."""
    for suffix in (TMP_SUFFIX, CORRUPT_SUFFIX):
        if entry.startswith(".") and entry.endswith(suffix) and len(entry) > len(suffix) + 1:
            return scope_of(entry[1: -len(suffix)])
    for rx in (ANY_SHARD_RE, MANIFEST_RE, ERRORS_RE, LOCK_RE):
        if m := rx.match(entry):
            return m.group("tag")
    return _NOT_OURS


__all__ = ["RunDirError"]  # defined in io.durable (the writer raises it too); re-exported here


class LockError(RunDirError):
    """Another live process is writing the directory."""


class FingerprintMismatch(RunDirError):
    """The directory holds a run with another model or other decoding parameters."""

    def __init__(self, out_dir: Path, diffs: dict[str, tuple[Any, Any]]):
        self.diffs = diffs
        parts = ", ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in ((k, *v) for k, v in diffs.items()))
        super().__init__(
            f"{out_dir} was written with different settings ({parts}); rerun with the same settings "
            "to resume, use another output directory, or pass --overwrite to discard it"
        )


def _show(v: Any) -> str:
    return "<absent>" if v is _ABSENT else orjson.dumps(v).decode()


_ABSENT = object()


# Fingerprint fields kept for display only: the checkpoint directory's name (its content is the
# `checkpoint` field), so an identical checkpoint under another name resumes.
DISPLAY_ONLY = frozenset({"model"})


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Differing fields of two fingerprints, nested dicts flattened to dotted keys (display-only
    fields excepted)."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted((a.keys() | b.keys()) - DISPLAY_ONLY)
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def normalize_fingerprint(fp: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip, so tuples/Paths/ints-as-floats compare the same as after a reload."""
    return orjson.loads(orjson.dumps(fp, default=str, option=orjson.OPT_SORT_KEYS))


# ---- lock -----------------------------------------------------------------------------------------


class RunLock:
    """An exclusive flock on `out/.lock`.

    flock, not an O_EXCL file: the kernel drops the lock when the holder dies (kill -9, OOM,
    power loss), so a stale lock needs no pid-liveness guess (pids are reused, and a pid means
    nothing on another host sharing the filesystem). The file is never deleted (deleting a lock
    file races with a process about to lock it); its content (pid, host, start) only serves the
    error message, and is emptied on a clean release, so content found at acquire time means the
    previous holder died. Linux NFS clients emulate flock with NFS byte-range locks, which hold
    across hosts; a filesystem without any lock support makes acquire fail with RunDirError.
    POSIX only (fcntl): the tool targets Linux/macOS batch machines.
    """

    def __init__(self, out_dir: Path, name: str = LOCK):
        self.path = out_dir / name
        self._fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self, *, brief: bool = False, wait_s: float = 0.0, what: str = "another run") -> None:
        """brief: this hold lasts only while a partition task opens the directory (the holder
        note says so). wait_s: keep retrying while the holder is such a brief one."""
        with writing(self.path):  # a read-only or unwritable directory: one line
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
                # An empty note: the holder has just locked and not yet written it.
                if (not holder or holder.get("brief")) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
                since = f" since {holder['started_at']}" if holder and "started_at" in holder else ""
                raise LockError(f"{self.path.parent} is locked by {who}{since}: {what} is writing it") from None
            except OSError as e:
                os.close(fd)
                raise RunDirError(f"cannot lock {self.path}: {e.strerror or e}") from None
        self.stale = _read_holder(fd) or None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now()}
        if brief:
            me["brief"] = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, orjson.dumps(me) + b"\n", 0)
        os.fsync(fd)
        self._fd = fd
        self._me = me

    def note(self, **fields: Any) -> None:
        """Add fields to the holder note (e.g. phase=generating, for operators and tests)."""
        if self._fd is None:
            return
        self._me = {**self._me, **fields}
        data = orjson.dumps(self._me) + b"\n"
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean exit: no stale-holder note for the next run
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        d = orjson.loads(data) if data.strip() else {}
        return d if isinstance(d, dict) else {}
    except (OSError, orjson.JSONDecodeError):
        return {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- the run directory ----------------------------------------------------------------------------


class RunDir:
    """Opens `out_dir` for writing one run: lock, fingerprint check, recovery, done ids.

    `fingerprint` is what must not change across a resume (model name + checkpoint fingerprint +
    run-level decoding parameters; the caller includes the format and the pass-through columns).
    A different one raises FingerprintMismatch, unless `overwrite=True`, which deletes this
    directory's outputs (shards, errors, manifest state; never foreign files) and starts afresh.
    `notes` lists what recovery did, for the CLI to print. Use as a context manager, or call
    `close()`; `close(complete=True)` marks the run finished.

    `format`: "parquet", "jsonl" or "openai" (io.formats); a directory holds one format (a manifest
    of another is refused like another fingerprint). `extra_fields`: the pass-through columns
    (io.schema.passthrough_fields of a Parquet input), after the fixed columns of every shard;
    records are checked against them and a resume verifies shards against the same schema.
    """

    def __init__(
        self,
        out_dir: str | Path,
        fingerprint: dict[str, Any],
        *,
        overwrite: bool = False,
        rows_per_shard: int = 10_000,
        row_group_rows: int = 1_000,
        partition: Partition | None = None,
        format: str = "parquet",  # noqa: A002 - the option's name
        extra_fields: Sequence[pa.Field] = (),
    ):
        self.out_dir = Path(out_dir)
        self.format = check_format(format)
        self.extra_fields = list(extra_fields)
        # A partition of one is the whole input: the unpartitioned layout.
        self.partition = partition if partition is not None and partition.count > 1 else None
        self.tag = self.partition.tag if self.partition else None
        self.layout = Layout(self.tag, shard_ext(self.format))
        if self.partition:
            fingerprint = {**fingerprint, "num_shards": self.partition.count}
        self.fingerprint = normalize_fingerprint(fingerprint)
        self.manifest_path = self.out_dir / self.layout.manifest
        self.notes: list[str] = []
        self.done_ids = DoneSet()
        self._shard_groups: dict[str, list[int]] = {}  # committed shard found at open -> its DoneSet groups
        self.rejected_again: list[PromptRow] = []  # set by the run loop (pipeline.first_to_do)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create {self.out_dir}: {e.strerror or e}") from None
        _refuse_foreign(self.out_dir)  # before the lock file is made: a foreign directory is never touched
        self._lock = RunLock(self.out_dir, self.layout.lock)
        self._lock.acquire(what=f"task {self.tag} of another run" if self.tag else "another run")
        dir_lock = None
        try:
            if self.tag:  # held only while opening (see the module docstring)
                dir_lock = RunLock(self.out_dir)
                dir_lock.acquire(brief=True, wait_s=OPEN_WAIT_S, what="an unpartitioned run")
            for lk in (self._lock, dir_lock):
                if lk is not None and lk.stale and not lk.stale.get("brief"):
                    s = lk.stale
                    self.notes.append(f"took over the lock of pid {s.get('pid')} on {s.get('host')}, which is gone")
            self._open(overwrite)
            self.errors = ErrorLog(self.out_dir / self.layout.errors)
            self.writer = ShardWriter(
                self.out_dir,
                {META_FINGERPRINT: orjson.dumps(self.fingerprint, option=orjson.OPT_SORT_KEYS).decode()},
                rows_per_shard,
                row_group_rows,
                names=self.layout,
                start_index=self._next_index,
                done=self.done_ids,
                on_commit=self._on_commit,
                fmt=self.format,
                extra=self.extra_fields,
            )
        except BaseException:
            self._lock.release()
            raise
        finally:
            if dir_lock is not None:
                dir_lock.release()
        self._closed = False

    # ---- public ---------------------------------------------------------------------------------
    def is_done(self, key: str) -> bool:
        """Committed in a shard, or already written to the open shard by this process. `key`:
        io.schema.sample_key(id, sample_index) (the id itself for sample 0)."""
        return key in self.done_ids or self.writer.is_pending(key)

    def add(self, record: dict[str, Any]) -> bool:
        """Write a finished row (committed with its shard). True: written (a stream's sink may say
        False when its reader has gone; a directory never does)."""
        self.writer.add(record)
        return True

    def note_phase(self, phase: str) -> None:
        """Record in the lock's holder note what this run is doing (`loading`, `generating`)."""
        self._lock.note(phase=phase)

    def reject(self, row: RejectedRow) -> None:
        """Log a rejected row (once across resumes)."""
        self.errors.add(row)

    def sync_rejects(self) -> None:
        self.errors.sync()

    def checkpoint(self) -> None:
        """Commit the open shard and make the rejects durable (bounds what a crash can cost)."""
        self.writer.flush()
        self.errors.sync()

    def committed_input(self, key: str) -> int | None:
        """For a row key (io.schema.sample_key) committed by an earlier run: its row's input hash
        (0: not recorded); None for any other key (see DoneSet.lookup)."""
        return self.done_ids.lookup(key)

    def orphans(self) -> Iterator[tuple[str, int]]:
        """(id, sample_index) of every row committed by an earlier run whose key no
        `committed_input` (or `is_done`) of this run asked for: rows whose input row is gone (or
        whose sample index is now out of range). Meaningful once the whole input has been read.
        Rows committed by this process never are. Lazy: read from their shards, a row group (or
        LINE_GROUP_ROWS lines) at a time."""
        for key in self.done_ids.orphans():
            yield split_key(key)

    def orphan_count(self) -> int:
        """How many rows `orphans` yields (without reading any shard)."""
        return self.done_ids.orphan_count()

    def retract(self, keys: Iterable[str]) -> int:
        """Remove the committed rows with these keys (io.schema.sample_key) from their shards, so
        that new versions of them can be written (`add`): exactly once per key at every instant a
        crash can happen. Returns the number of rows removed (a key committed in no shard of this
        layout, another partition task's included, is skipped). A key written by this process
        (committed or in the open shard) raises ValueError before anything is changed: only the
        rows of earlier runs can be retracted.

        Each affected shard is rewritten once per call, without those rows, in place: the filtered
        copy goes to its `.tmp` name (same format and schema, key-value metadata and fingerprint
        included; Parquet with the writer's settings, each row group keeping its remaining rows;
        JSON lines byte for byte), is fsynced, and replaces the shard (os.replace, then the
        directory is fsynced). Before that rename the manifest records `"rewrites": {shard:
        [old_rows, new_rows]}`; after it, the shard's entry gets its new counts and the record
        goes. Recovery accepts a shard with either count of a pending record (the manifest's own
        count would refuse it and set it aside), so a crash before the rename leaves the old
        shard, its rows still committed (the next run finds them changed again and retracts them
        again; its .tmp is removed at open), and one after it leaves the rows removed, not done.
        A shard left with no row is removed instead: the manifest stops listing it (with a record
        [old_rows, 0]) before it is unlinked, and recovery accepts it present or missing.
        After this returns, the keys are not done (`is_done`, `committed_input`: None; the writer
        takes them again) and `rows_committed` and the manifest count the rows left."""
        drop = set(keys)
        for key in drop:
            if self.writer.is_pending(key) or self.done_ids.added_here(key):
                raise ValueError(f"{describe_key(key)} was written by this run; only rows of earlier runs can be "
                                 "retracted")
        shard_of = {g: name for name, gs in self._shard_groups.items() for g in gs}
        plan: dict[str, tuple[set[str], list[int]]] = {}
        for key in drop:
            for entry, group in self.done_ids.entries(key):
                ks, es = plan.setdefault(shard_of[group], (set(), []))
                ks.add(key)
                es.append(entry)
        return sum(self._rewrite(name, *plan[name]) for name in sorted(plan))

    def was_rejected(self, row: PromptRow) -> bool:
        """An earlier run of this directory (same fingerprint) rejected this very row."""
        return self.errors.was_rejected(row.id, row_excerpt(row))

    @property
    def errors_path(self) -> Path:
        return self.errors.path

    @property
    def rows_committed(self) -> int:
        """Rows in this layout's committed shards (those of earlier runs and this one's so far)."""
        return len(self.done_ids)

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def close(self, complete: bool = False) -> None:
        """Commit the open shard, make sure the directory loads even with zero rows, unlock."""
        if self._closed:
            return
        self._closed = True
        try:
            self.writer.close()
            if not self._manifest["shards"] and not self.writer.failed:
                self.writer.write_empty_shard()
            self.errors.sync()
            self._manifest["complete"] = complete
            self._save()
        finally:
            self.errors.close()
            self._lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close(complete=False)
            return
        try:  # already failing (e.g. the disk is full): that error is the one to report
            self.close(complete=False)
        except (OSError, UserError):
            pass

    # ---- open / recover -------------------------------------------------------------------------
    def _open(self, overwrite: bool) -> None:
        own = self.tag
        entries = sorted(os.listdir(self.out_dir))
        scope = {e: scope_of(e) for e in entries}
        # Temporary files of this layout only (another task's are its work in progress; a .tmp of
        # no known layout is not ours at all). They are removed only once the checks below have
        # found the directory to be ours (or empty of anything but hidden foreign files).
        removed = [e for e in entries if e.startswith(".") and e.endswith(TMP_SUFFIX) and scope[e] == own]
        entries = [e for e in entries if not e.endswith(TMP_SUFFIX)]
        manifest, bad_manifest = self._load_manifest(own)
        ours = {e for e in entries if scope[e] == own}
        mine = self.manifest_path.name
        lock = self.layout.lock
        # Other layouts' entries (other tasks, or the unpartitioned layout), by layout.
        others: dict[str | None, set[str]] = {}
        for e in entries:
            if scope[e] is not _NOT_OURS and scope[e] != own:
                others.setdefault(scope[e], set()).add(e)
        # Hidden entries that are not ours (.DS_Store, .nfs*) are invisible to loaders: ignore them.
        foreign = [e for e in entries if scope[e] is _NOT_OURS and not e.startswith(".")]
        any_manifest = manifest is not None or any(Layout(sc).manifest in names for sc, names in others.items())
        if any_manifest and any(e.endswith(f".{self.layout.ext}") for e in foreign):
            self.notes.append(f"other *.{self.layout.ext} files in the directory will be picked up by dataset loaders")
        if manifest is None:
            if foreign and not any_manifest:
                raise RunDirError(
                    f"{self.out_dir} is not empty and is not a twotower output directory "
                    f"(no {mine}; found {', '.join(foreign[:3])}); choose an empty or new directory"
                )
            if (ours - {lock}) and not overwrite:
                why = f"its {mine} is unreadable ({bad_manifest})" if bad_manifest else f"it has no {mine}"
                raise RunDirError(f"{self.out_dir} holds twotower outputs but {why}; pass --overwrite")
        elif not overwrite:
            if (not others and _nothing_committed(manifest) and manifest.get("schema_version") == SCHEMA_VERSION
                    and fingerprint_diff(manifest.get("fingerprint") or {}, self.fingerprint)):
                # e.g. a run that failed before its first row (a broken checkpoint, a typo): with
                # no committed row there is nothing to protect, so the repaired run starts afresh
                overwrite = True
                self.notes.append(f"{self.out_dir} held no committed row of its earlier settings: started afresh")
            else:
                self._check_compatible(manifest)
        # Other layouts: refused when written with other settings, or cleared by --overwrite. Every
        # manifest was checked against those present when it was written (under `.lock`), so they
        # all agree and checking one of them is enough: a job array of N tasks opening at once
        # reads N manifests in all, not N x N, while each holds `.lock`.
        conflicts, checked = [], False
        for sc, names in sorted(others.items(), key=lambda kv: kv[0] or ""):
            if not names - {Layout(sc).lock}:
                continue  # only a lock file: that layout never wrote anything (or was cleared)
            if overwrite:
                m = self._load_manifest(sc)[0]
                if m is None or self._incompatible(m):
                    conflicts.append(sc)
                continue
            if checked and Layout(sc).manifest in names:
                continue
            m = self._load_manifest(sc)[0]
            if m is None:
                raise RunDirError(
                    f"{self.out_dir} holds twotower outputs of {_layout(sc)} without a readable "
                    f"{Layout(sc).manifest} ({', '.join(sorted(names)[:2])}); pass --overwrite"
                )
            if not checked:
                self._check_compatible(m)
                checked = True
        if overwrite:
            cleared = 0
            for sc in conflicts:
                cleared += self._clear_layout(sc, sorted(others[sc] - {Layout(sc).lock}))
            if ours - {lock}:
                cleared += self._clear_layout(own, sorted(ours - {lock, mine}))
                manifest = None
            if cleared:
                self.notes.append(f"--overwrite: removed {cleared} file(s) of the previous run")
        if removed:
            with writing(self.out_dir):
                for e in removed:
                    (self.out_dir / e).unlink(missing_ok=True)
                fsync_dir(self.out_dir)
            self.notes.append(f"removed {len(removed)} uncommitted temporary file(s) left by a crash")
        if manifest is None:
            manifest = {"format": MANIFEST_FORMAT, "schema_version": SCHEMA_VERSION,
                        "shard_format": self.format, "extra_fields": describe_fields(self.extra_fields),
                        "fingerprint": self.fingerprint, "created_at": _now(), "shards": []}
            if self.partition:
                manifest["partition"] = {"index": self.partition.index, "count": self.partition.count}
        manifest["complete"] = False  # until this run's close(complete=True)
        self._manifest = manifest
        self._recover_shards()
        self._save()

    def _incompatible(self, m: dict[str, Any]) -> bool:
        return m.get("schema_version") != SCHEMA_VERSION or _shard_format(m) != self.format or bool(
            fingerprint_diff(m.get("fingerprint") or {}, self.fingerprint))

    def _check_compatible(self, m: dict[str, Any]) -> None:
        """Raise unless the manifest `m` (this layout's or another task's) matches this run."""
        if m.get("schema_version") != SCHEMA_VERSION:
            raise RunDirError(
                f"{self.out_dir} was written with output schema version {m.get('schema_version')}; "
                f"this version writes {SCHEMA_VERSION}: use another output directory or --overwrite"
            )
        diffs = fingerprint_diff(m.get("fingerprint") or {}, self.fingerprint)
        if set(diffs) == {"num_shards"}:  # the same settings, another partitioning: say so plainly
            theirs = diffs["num_shards"][0]
            was = "an unpartitioned run" if theirs is _ABSENT else f"a run with --num-shards {theirs}"
            now = f"--num-shards {self.partition.count}" if self.partition else "no --num-shards"
            raise RunDirError(
                f"{self.out_dir} holds {was}; this run has {now}: every task of a job array must use "
                "the same --num-shards (use another output directory, or --overwrite to discard it)"
            )
        if diffs:
            raise FingerprintMismatch(self.out_dir, diffs)
        if _shard_format(m) != self.format:  # the fingerprint says so too, when the caller put it there
            raise RunDirError(
                f"{self.out_dir} holds {_shard_format(m)} shards; this run writes {self.format}: use the same "
                "format to resume, another output directory, or --overwrite to discard it"
            )

    def _load_manifest(self, tag: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
        p = self.out_dir / Layout(tag).manifest
        try:
            m = orjson.loads(p.read_bytes())
        except FileNotFoundError:
            return None, None
        except (OSError, orjson.JSONDecodeError) as e:
            return None, str(e)
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            return None, "not a twotower manifest"
        if not isinstance(m.get("fingerprint"), dict):
            return None, "its fingerprint is not a JSON object"
        shards = m.get("shards")
        if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                                   for s in shards):
            # Only a cache of the shard files (see the module docstring): rebuilt from them.
            if tag == self.tag:
                self.notes.append(f"{p.name}: its shard list is malformed; rebuilt from the shard files")
            m["shards"] = []
        return m, None

    def _clear_layout(self, tag: str | None, names: list[str]) -> int:
        """--overwrite. Shards go first, the manifest is replaced (or, for another layout, removed)
        last: a crash midway leaves a manifest with a subset of its shards, itself a valid
        resumable state. Another task's files are removed under that task's lock."""
        lock = None
        if tag is not None and tag != self.tag:
            lock = RunLock(self.out_dir, Layout(tag).lock)
            lock.acquire(what=f"task {tag} of another run")
        try:
            m = Layout(tag).manifest
            for n in sorted(names, key=lambda n: n == m):
                (self.out_dir / n).unlink(missing_ok=True)
            fsync_dir(self.out_dir)
        finally:
            if lock is not None:
                lock.release()
        return len(names)

    def _recover_shards(self) -> None:
        """Rebuild done ids from this layout's committed shards; reconcile the manifest's shard list."""
        listed = {s["name"]: s for s in self._manifest.get("shards", [])}
        rewrites = _pending_rewrites(self._manifest.pop("rewrites", None))  # a retraction cut short
        rx = self.layout.shard_re
        present = sorted(e for e in os.listdir(self.out_dir) if rx.match(e))
        indices = [int(m.group(1)) for n in (*present, *listed, *rewrites) if (m := rx.match(n))]
        self._next_index = max(indices, default=-1) + 1
        shards = []
        expected = output_schema(extra=self.extra_fields).remove_metadata()
        for name in present:
            path = self.out_dir / name
            recorded = listed.get(name, {}).get("rows")
            pending = rewrites.get(name)
            try:
                if self.format in LINE_FORMATS:
                    groups, rows = _verify_lines(path, self.format, self.extra_fields)
                else:
                    groups, rows = _verify_shard(path, expected)
                if pending is not None:  # rewritten or not: either count is a committed state
                    if rows not in pending:
                        raise ValueError(f"it has {rows} rows, {self.manifest_path.name} records a rewrite "
                                         f"from {pending[0]} to {pending[1]}")
                elif isinstance(recorded, int) and not isinstance(recorded, bool) and recorded != rows:
                    raise ValueError(f"it has {rows} rows, {self.manifest_path.name} records {recorded}")
            except (pa.ArrowException, OSError, KeyError, ValueError) as e:
                aside = path.with_name(Layout.corrupt(name))
                with writing(aside):
                    os.replace(path, aside)
                    fsync_dir(self.out_dir)
                why = " ".join(str(e).split())[:200]
                self.notes.append(f"{name} does not read whole ({why}); moved to {aside.name}, its rows will be redone")
                continue
            self._shard_groups[name] = [self.done_ids.add_group(group, hashes, inputs)
                                        for group, hashes, inputs in groups]
            if pending is not None:
                old, new = pending
                self.notes.append(f"{name}: an interrupted retraction of {old - new} row(s) " + (
                    "was completed" if rows == new != old else "did not happen; they stay committed"))
            elif name not in listed:
                self.notes.append(f"adopted {name}, committed just before an interruption")
            shards.append({"name": name, "rows": rows, "bytes": path.stat().st_size})
        self.done_ids.freeze()
        dupes = self.done_ids.duplicates
        for name in sorted((set(listed) | set(rewrites)) - set(present)):
            if rewrites.get(name, (0, None))[1] == 0:
                self.notes.append(f"removed {name}: an interrupted retraction of its {rewrites[name][0]} row(s) "
                                  "was completed")
            else:
                self.notes.append(f"{name} is listed in {self.manifest_path.name} but missing; its rows will be "
                                  "redone")
        if dupes:
            self.notes.append(f"{dupes} row(s) appear in more than one shard (files were copied in by hand?)")
        self._manifest["shards"] = shards

    # ---- commits ----------------------------------------------------------------------------------
    def _on_commit(self, info: ShardInfo) -> None:
        self.errors.sync()  # the manifest's `rejected` count never exceeds what is durable
        self._manifest["shards"].append({"name": info.name, "rows": info.rows, "bytes": info.bytes})
        self._save()

    # ---- retraction (see `retract`) ---------------------------------------------------------------
    def _rewrite(self, name: str, drop: set[str], entries: list[int]) -> int:
        """Rewrite the committed shard `name` (one found at open) without its rows keyed `drop`,
        whose DoneSet entries are `entries`. Returns the number of rows removed."""
        path = self.out_dir / name
        tmp = path.with_name(Layout.tmp(name))
        groups = self._shard_groups[name]
        m = self._manifest
        shards = m["shards"]
        try:
            with writing(tmp):
                if self.format in LINE_FORMATS:
                    new_keys, old_rows, new_rows = self._filter_lines(path, tmp, groups, drop)
                else:
                    new_keys, old_rows, new_rows = self._filter_parquet(path, tmp, groups, drop)
                if not new_rows:
                    tmp.unlink()  # the shard goes: nothing to rename over it
            if old_rows - new_rows != len(entries):
                raise self._changed(path)
            m.setdefault("rewrites", {})[name] = [old_rows, new_rows]
            if not new_rows:  # listed no more before it is unlinked
                m["shards"] = [s for s in shards if s["name"] != name]
            self._save()  # the record: from here on, recovery accepts either count
            with writing(path):
                if new_rows:
                    os.replace(tmp, path)  # the commit point
                else:
                    os.unlink(path)  # the commit point
        except Exception:  # not BaseException: an interrupt just after the commit point must keep the record
            tmp.unlink(missing_ok=True)
            m["shards"] = shards
            self._drop_rewrite(name)  # on disk it stays pending until the next save: either count is true
            raise
        self.done_ids.forget(entries)
        for group, key in zip(groups, new_keys, strict=True):
            self.done_ids.regroup(group, key)
        if new_rows:
            self._shard_groups[name] = [g for g, key in zip(groups, new_keys, strict=True) if key is not None]
        else:
            del self._shard_groups[name]
        with writing(path):
            fsync_dir(self.out_dir)
        self._drop_rewrite(name)
        for entry in m["shards"]:
            if entry["name"] == name:
                entry.update(rows=new_rows, bytes=path.stat().st_size)
        self._save()
        return old_rows - new_rows

    def _drop_rewrite(self, name: str) -> None:
        rewrites = self._manifest.get("rewrites", {})
        rewrites.pop(name, None)
        if not rewrites:
            self._manifest.pop("rewrites", None)

    def _changed(self, path: Path) -> RunDirError:
        return RunDirError(f"{path} changed while this run had it open (do not edit a run directory in use); "
                           "rerun to resume")

    def _filter_parquet(self, path: Path, tmp: Path, groups: list[int],
                        drop: set[str]) -> tuple[list[Any], int, int]:
        """Copy Parquet shard `path` to `tmp` without the rows keyed `drop`, row group by row group
        (one in memory at a time; a row group left empty is not written). Returns the new DoneSet
        key of each of its groups (None: emptied), and the rows before and after."""
        new_keys: list[Any] = []
        old = new = written = 0
        with pq.ParquetFile(path, page_checksum_verification=True, pre_buffer=False) as pf:
            if pf.metadata.num_row_groups != len(groups):
                raise self._changed(path)
            out = _ParquetShard(tmp, pf.schema_arrow)  # the writer's settings; the shard's own metadata
            try:
                for rg, group in enumerate(groups):
                    if self.done_ids.group_key(group) != (path, rg):
                        raise self._changed(path)
                    t = pf.read_row_group(rg, use_threads=False)
                    ids, samples = t.column("id").to_pylist(), t.column("sample_index").to_pylist()
                    keep = [n for n, (i, k) in enumerate(zip(ids, samples, strict=True))
                            if sample_key(i, k) not in drop]
                    old += t.num_rows
                    if not keep:
                        new_keys.append(None)
                        continue
                    if len(keep) < t.num_rows:
                        t = t.take(_int_array(keep))
                    out.write_table(t)
                    new_keys.append((path, written))
                    written += 1
                    new += t.num_rows
                out.commit()
            except BaseException:
                out.discard()
                raise
        return new_keys, old, new

    def _filter_lines(self, path: Path, tmp: Path, groups: list[int],
                      drop: set[str]) -> tuple[list[Any], int, int]:
        """The same for a JSON-lines shard: the lines kept are copied byte for byte."""
        new_keys: list[Any] = []
        old = new = pos = 0
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            for group in groups:
                _, offset, nbytes, fmt = self.done_ids.group_key(group)
                data = src.read(nbytes)
                if offset != pos or len(data) != nbytes or not data.endswith(b"\n"):
                    raise self._changed(path)
                pos += nbytes
                lines = [line + b"\n" for line in data.split(b"\n")[:-1]]
                kept = [line for line in lines if line_key(line, fmt) not in drop]
                old += len(lines)
                new += len(kept)
                if kept:
                    start = dst.tell()
                    dst.write(b"".join(kept))
                    new_keys.append((path, start, dst.tell() - start, fmt))
                else:
                    new_keys.append(None)
            if src.read(1):
                raise self._changed(path)
            dst.flush()
            os.fsync(dst.fileno())
        return new_keys, old, new

    def _save(self) -> None:
        m = self._manifest
        m["rows"] = sum(s["rows"] for s in m["shards"])
        m["rejected"] = self.errors.count if hasattr(self, "errors") else m.get("rejected", 0)
        m["updated_at"] = _now()
        atomic_write_bytes(self.manifest_path, orjson.dumps(m, option=orjson.OPT_INDENT_2),
                           self.manifest_path.with_name(Layout.tmp(self.manifest_path.name)))


Groups = list[tuple[Any, np.ndarray, np.ndarray]]  # (DoneSet group key, key hashes, input hashes)
LINE_GROUP_ROWS = 1_000  # lines of a JSON-lines shard per DoneSet group (what a lazy confirmation reads)


def _nothing_committed(m: dict[str, Any]) -> bool:
    """A manifest of a run that committed no row (its shards, if any, are empty)."""
    shards = m.get("shards")
    return isinstance(shards, list) and all(isinstance(x, dict) and x.get("rows") == 0 for x in shards) \
        and not m.get("rewrites")


def _verify_shard(path: Path, expected: pa.Schema) -> tuple[Groups, int]:
    """Read a committed Parquet shard whole (every column of every row group, page checksums
    verified), check its schema and row counts against its footer, and return per row group its
    DoneSet group key `(path, row group)`, the 64-bit hashes of its rows' keys (from the `id` and
    `sample_index` columns) and its rows' input hashes (0: none recorded), and its row count.
    Raises on any damage. Memory: one row group at a time."""
    groups: Groups = []
    rows = 0
    # pre_buffer off, one thread: a resume's peak memory must not grow with the shards it reads
    with pq.ParquetFile(path, page_checksum_verification=True, pre_buffer=False) as pf:
        if not pf.schema_arrow.remove_metadata().equals(expected):
            raise ValueError("its columns are not this version's output schema")
        md = pf.metadata
        for rg in range(md.num_row_groups):
            t = pf.read_row_group(rg, use_threads=False)
            if t.num_rows != md.row_group(rg).num_rows:
                raise ValueError(f"row group {rg} has {t.num_rows} rows, its footer says {md.row_group(rg).num_rows}")
            ids, samples = t.column("id"), t.column("sample_index")
            if ids.null_count or samples.null_count:
                raise ValueError("null ids or sample indices")
            inputs = _input_hashes(t.column("input_hash").combine_chunks())
            keys = _key_hashes(ids.combine_chunks(), samples.combine_chunks())
            groups.append(((path, rg), keys, inputs))
            rows += t.num_rows
        if rows != md.num_rows:
            raise ValueError(f"{rows} rows read, its footer says {md.num_rows}")
    return groups, rows


def _verify_lines(path: Path, fmt: str, extra: Sequence[pa.Field]) -> tuple[Groups, int]:
    """The same for a JSON-lines shard of format `fmt`: every line must decode to a valid record
    (io.formats.record_from_line, with the pass-through columns `extra`) and end with a newline (a
    cut-off last line is damage). Groups of LINE_GROUP_ROWS lines, keyed `(path, offset, bytes,
    fmt)`. Memory: one group at a time."""
    groups: Groups = []
    rows = 0
    keys: list[str] = []
    inputs: list[str | None] = []
    start = pos = 0

    def close_group() -> None:
        nonlocal start
        if keys:
            groups.append(((path, start, pos - start, fmt), id_hashes(keys), _input_hash_values(inputs)))
            keys.clear()
            inputs.clear()
        start = pos

    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                raise ValueError(f"line {n} is cut off (no newline at the end of the file)")
            try:
                rec = record_from_line(line, fmt, extra)
            except ValueError as e:
                raise ValueError(f"line {n}: {e}") from None
            keys.append(sample_key(rec["id"], rec["sample_index"]))
            inputs.append(rec["input_hash"])
            pos += len(line)
            rows += 1
            if len(keys) >= LINE_GROUP_ROWS:
                close_group()
    close_group()
    return groups, rows


def _int_array(values: list[int]) -> pa.Array:
    """An int64 Arrow array of `values` (from a buffer: pa.array of a list imports pandas)."""
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(np.array(values, dtype=np.int64))])


def _input_hash_values(values: list[str | None]) -> np.ndarray:
    """_input_hashes of a list (not through pa.array, which imports pandas where it is installed)."""
    out = np.zeros(len(values), dtype=np.uint64)
    for i, v in enumerate(values):
        if v:
            try:
                out[i] = int(v, 16) & 0xFFFF_FFFF_FFFF_FFFF
            except ValueError:
                pass  # not one of ours: unknown, never a mismatch
    return out


def _key_hashes(ids: pa.Array, samples: pa.Array) -> np.ndarray:
    """id_hash(sample_key(id, k)) of each row, from its `id` and `sample_index` values (no nulls)."""
    # from the buffer: Array.to_numpy imports pandas (35 MB of a resume's peak RSS)
    ks = np.frombuffer(samples.buffers()[1], dtype="<i8")[samples.offset: samples.offset + len(samples)]
    if not ks.any():
        return _string_hashes(ids)  # no samples: the key is the id
    offsets, data = _string_buffers(ids)
    b2 = hashlib.blake2b
    out = b"".join(
        b2(data[offsets[i]:offsets[i + 1]] if not k else b"%s\x00%d" % (data[offsets[i]:offsets[i + 1]], k),
           digest_size=8, person=_ID_PERSON).digest()
        for i, k in enumerate(ks.tolist())
    )
    return np.frombuffer(out, dtype="<u8").astype(np.uint64)


def _string_buffers(arr: pa.Array) -> tuple[np.ndarray, memoryview]:
    """The offsets and data of a string array, without making a Python object per value (a
    resume's memory must not grow with the rows it checks: pymalloc keeps freed arenas)."""
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset: arr.offset + len(arr) + 1]
    return offsets, memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")


def _string_hashes(arr: pa.Array) -> np.ndarray:
    """id_hash of each value of a string array (no nulls)."""
    offsets, data = _string_buffers(arr)
    b2 = hashlib.blake2b
    out = b"".join(b2(data[offsets[i]:offsets[i + 1]], digest_size=8, person=_ID_PERSON).digest()
                   for i in range(len(arr)))
    return np.frombuffer(out, dtype="<u8").astype(np.uint64)


def _input_hashes(arr: pa.Array) -> np.ndarray:
    """The input_hash column as uint64 (0: null or not one of ours)."""
    if len(arr) and not arr.null_count:
        offsets, data = _string_buffers(arr)
        if offsets[-1] - offsets[0] == 16 * len(arr):  # all 16 hex digits: one fromhex for the lot
            try:
                raw = bytes.fromhex(bytes(data[offsets[0]:offsets[-1]]).decode("ascii"))
                return np.frombuffer(raw, dtype=">u8").astype(np.uint64)
            except ValueError:
                pass
    return _input_hash_values(arr.to_pylist())


# ---- the done set ---------------------------------------------------------------------------------

_ID_PERSON = b"twotower-done"
_GONE = 1 << 31  # DoneSet entry flags, in the top bits of its row-group word
_FOUND = 1 << 30
_GROUP = _FOUND - 1  # the row-group index: the low 30 bits


def split_key(key: str) -> tuple[str, int]:
    """(id, sample_index) of a row key: the inverse of io.schema.sample_key (the id alone for
    sample 0, `id + NUL + k` for sample k >= 1; ids never hold a NUL)."""
    row_id, nul, k = key.partition("\x00")
    return (row_id, int(k)) if nul else (key, 0)


def id_hash(row_id: str) -> int:
    """The 64-bit key of an id in a DoneSet (stable across processes: blake2b, not hash())."""
    return int.from_bytes(hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8,
                                          person=_ID_PERSON).digest(), "little")


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """id_hash of each id, as a uint64 array."""
    b2 = hashlib.blake2b
    data = b"".join(b2(i.encode("utf-8", "surrogatepass"), digest_size=8, person=_ID_PERSON).digest() for i in ids)
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


class DoneSet:
    """The row keys already done, compact: ~20 bytes per committed row instead of a Python str in
    a set. A key is io.schema.sample_key(id, sample_index): the id itself for sample 0, so "id"
    below reads "key" for a run with samples.

    Committed ids (those of the shards found at open) are kept as sorted 64-bit blake2b hashes, with
    per entry the row group it came from (uint32) and its row's input hash (uint64). A lookup is a
    binary search; a hash hit is confirmed against the real ids of that row group, read lazily
    from its shard (an LRU of `cache_groups` row groups: resume reads input in roughly the order
    the shards were written), so a hash collision can never make a row count as done when it is
    not (nor the other way round: every committed id's hash is present). Ids committed by this
    process (`update`) go to a plain set: they are this run's work, not the backlog.

    Two flags ride in the top bits of an entry's row-group word (so the budget stays 20 bytes):
    FOUND, set by a confirmed `lookup` (every entry of that key), which is what tells the
    committed rows whose key no input row asked for this run (`orphans`); and GONE, set by
    `forget` when the row was removed from its shard (RunDir.retract): lookups skip it, `len`
    drops it, and the key may be committed again (`update`).

    `load_group(key)` returns the row keys of a group added with `add_group(key, ...)` (by default
    key = (shard path, row group index) of a Parquet shard, or (shard path, byte offset, bytes,
    format) of a JSON-lines one, read from the shard: `read_group_keys`). `regroup` changes a
    group's key when its shard is rewritten (None: no row of it is left).
    """

    def __init__(self, load_group: Callable[[Any], list[str]] | None = None, cache_groups: int = 8):
        self._h = np.empty(0, dtype=np.uint64)
        self._loc = np.empty(0, dtype=np.uint32)  # the group index | _FOUND | _GONE
        self._inp = np.empty(0, dtype=np.uint64)
        self._keys: list[Any] = []
        self._pending: list[tuple[np.ndarray, np.ndarray, int]] = []
        self._load_group = load_group or read_group_keys
        self._cache: OrderedDict[int, frozenset[str]] = OrderedDict()
        self._cache_groups = cache_groups
        self._new: set[str] = set()
        self._dup = np.empty(0, dtype=np.int64)  # entries whose id an earlier entry (the one before) holds too
        self._gone = 0
        self.duplicates = 0  # committed entries whose id was already committed (hand-copied shards)

    def add_group(self, key: Any, hashes: np.ndarray, inputs: np.ndarray | None = None) -> int:
        """Add the committed ids of one row group (their hashes); call freeze() when all are in.
        Returns the group's index (for `regroup`)."""
        if inputs is None:
            inputs = np.zeros(len(hashes), dtype=np.uint64)
        if len(self._keys) > _GROUP:
            raise ValueError(f"a done set holds at most {_GROUP + 1} groups")
        self._keys.append(key)
        self._pending.append((hashes, inputs, len(self._keys) - 1))
        return len(self._keys) - 1

    def freeze(self) -> None:
        if not self._pending:
            return
        # Frugal with memory (a resume's peak RSS): the groups are copied into preallocated arrays
        # and dropped one by one, and the arrays are put in order one at a time.
        n = len(self._h) + sum(len(p[0]) for p in self._pending)
        h, loc, inp = np.empty(n, np.uint64), np.empty(n, np.uint32), np.empty(n, np.uint64)
        at = len(self._h)
        h[:at], loc[:at], inp[:at] = self._h, self._loc, self._inp
        self._h = self._loc = self._inp = None
        pending, self._pending = self._pending, []
        pending.reverse()
        while pending:
            hashes, inputs, group = pending.pop()
            h[at:at + len(hashes)], loc[at:at + len(hashes)], inp[at:at + len(hashes)] = hashes, group, inputs
            at += len(hashes)
            del hashes, inputs
        order = np.argsort(h, kind="stable")
        h = h[order]
        loc = loc[order]
        inp = inp[order]
        del order
        self._h, self._loc, self._inp = h, loc, inp
        same = np.flatnonzero(self._h[1:] == self._h[:-1])
        # equal hashes: the same id in two shards, or (2^-64 odds) two ids that collide
        self._dup = np.array([i + 1 for i in same if self._with_hash(i) & self._with_hash(i + 1)], dtype=np.int64)
        self.duplicates = len(self._dup)

    def _with_hash(self, i: int) -> set[str]:
        h = int(self._h[i])
        return {x for x in self._ids_of(int(self._loc[i]) & _GROUP) if id_hash(x) == h}

    def lookup(self, row_id: str) -> int | None:
        """Committed before this process (and not forgotten since): its input hash (0: unknown),
        and the key counts as found (not an orphan); otherwise None."""
        hit = None
        for i, _ in self.entries(row_id):
            if hit is None:
                hit = int(self._inp[i])
            self._loc[i] |= _FOUND  # every copy of the key (a hand-copied shard holds one too)
        return hit  # None also for a hash collision with another id: not done

    def entries(self, row_id: str) -> list[tuple[int, int]]:
        """The live committed entries of a key, as (entry, group index): confirmed against the
        real ids of their groups; more than one only for a key committed in several shards."""
        if not len(self._h):
            return []
        h = np.uint64(id_hash(row_id))
        lo = int(np.searchsorted(self._h, h, "left"))
        if lo == len(self._h) or self._h[lo] != h:
            return []
        hi = int(np.searchsorted(self._h, h, "right"))
        out = []
        for i in range(lo, hi):
            loc = int(self._loc[i])
            if not loc & _GONE and row_id in self._ids_of(loc & _GROUP):
                out.append((i, loc & _GROUP))
        return out

    def forget(self, entries: Iterable[int]) -> None:
        """The rows of these entries (from `entries`) were removed from their shards: their keys
        are not done any more (every entry of a key must go at once)."""
        idx = np.unique(np.fromiter(entries, dtype=np.int64))
        if len(idx):
            idx = idx[(self._loc[idx] & _GONE) == 0]
            self._loc[idx] |= _GONE
            self._gone += len(idx)

    def group_key(self, group: int) -> Any:
        """The key group `group` is read with (see `add_group`, `regroup`)."""
        return self._keys[group]

    def regroup(self, group: int, key: Any) -> None:
        """Group `group` (an `add_group` index) is now read with `key` (None: it holds no row)."""
        self._keys[group] = key
        self._cache.pop(group, None)

    def _ids_of(self, loc: int) -> frozenset[str]:
        ids = self._cache.get(loc)
        if ids is None:
            key = self._keys[loc]
            ids = frozenset(self._load_group(key)) if key is not None else frozenset()
            self._cache[loc] = ids
            if len(self._cache) > self._cache_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(loc)
        return ids

    def __contains__(self, row_id: object) -> bool:
        return isinstance(row_id, str) and (row_id in self._new or self.lookup(row_id) is not None)

    def update(self, ids: Iterable[str]) -> None:
        """Ids committed by this process."""
        self._new.update(ids)

    def added_here(self, row_id: str) -> bool:
        """Committed by this process (`update`)."""
        return row_id in self._new

    def _live_duplicates(self, flags: int = 0) -> int:
        """Duplicate entries (see `duplicates`) that are not forgotten and have none of `flags`."""
        if not len(self._dup):
            return 0
        return int(np.count_nonzero((self._loc[self._dup] & np.uint32(_GONE | flags)) == 0))

    def __len__(self) -> int:
        return len(self._h) - self._gone - self._live_duplicates() + len(self._new)

    def orphan_count(self) -> int:
        """Committed keys (not forgotten) that no `lookup` found: see `orphans`."""
        free = np.count_nonzero((self._loc & np.uint32(_GONE | _FOUND)) == 0)
        return int(free) - self._live_duplicates(_FOUND)

    def orphans(self) -> Iterator[str]:
        """The committed keys (not forgotten) that no `lookup` found, each once, group by group:
        read lazily from their groups (one group's keys at a time; the index keeps a list of the
        orphans' hashes and groups while it runs). Keys committed by this process never are."""
        free = np.flatnonzero((self._loc & np.uint32(_GONE | _FOUND)) == 0)
        if not len(free):
            return
        groups = self._loc[free] & np.uint32(_GROUP)
        order = np.argsort(groups, kind="stable")
        groups, hashes = groups[order], self._h[free][order]
        del free, order
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        ends = np.r_[starts[1:], len(groups)]
        dup_hashes = set(self._h[self._dup].tolist())
        seen: set[str] = set()  # the keys of duplicated entries, yielded once
        for a, b in zip(starts.tolist(), ends.tolist()):
            key = self._keys[int(groups[a])]
            ids = self._load_group(key) if key is not None else []
            hs = id_hashes(ids)
            for row_id, h, hit in zip(ids, hs.tolist(), np.isin(hs, hashes[a:b]).tolist()):
                if not hit:
                    continue
                if h in dup_hashes:
                    if row_id in seen:
                        continue
                    seen.add(row_id)
                yield row_id

    def __iter__(self) -> Iterator[str]:
        """Every id, committed ones read back from their shards (for tests and tools: a run never
        iterates its done set)."""
        seen: set[str] = set()
        for key in self._keys:
            for i in self._load_group(key) if key is not None else ():
                if i not in seen:
                    seen.add(i)
                    yield i
        yield from (i for i in self._new if i not in seen)

    def nbytes(self) -> int:
        """The committed index's arrays (the ids of this run's set are extra)."""
        return self._h.nbytes + self._loc.nbytes + self._inp.nbytes


def read_group_keys(key: tuple[Any, ...]) -> list[str]:
    """The row keys of one DoneSet group of a shard: `(path, row group)` of a Parquet shard, or
    `(path, offset, bytes, format)` of a JSON-lines one (as _verify_shard/_verify_lines made them)."""
    if len(key) == 2:
        path, rg = key
        with pq.ParquetFile(path, pre_buffer=False) as pf:
            t = pf.read_row_group(rg, columns=["id", "sample_index"], use_threads=False)
        return [sample_key(i, k) for i, k in zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist(),
                                                 strict=True)]
    path, offset, nbytes, fmt = key
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(nbytes)
    return [line_key(line, fmt) for line in data.splitlines()]


def _pending_rewrites(rec: Any) -> dict[str, tuple[int, int]]:
    """The manifest's `rewrites` record ({shard: [old_rows, new_rows]}, see RunDir.retract), its
    malformed entries left out (their shards are then checked against the shard list alone)."""
    if not isinstance(rec, dict):
        return {}
    return {name: (v[0], v[1]) for name, v in rec.items()
            if isinstance(v, list) and len(v) == 2 and all(type(x) is int and x >= 0 for x in v)}


def _shard_format(m: dict[str, Any]) -> str:
    """The format a manifest records (parquet when it records none)."""
    return m.get("shard_format") or "parquet"


def _refuse_foreign(out_dir: Path) -> None:
    """Refuse a directory that holds visible files and no twotower manifest of any layout (e.g.
    `-o ~` by mistake), before anything in it is created, changed or removed. _open checks again
    under the lock; this early look only makes sure a foreign directory is never touched."""
    try:
        entries = os.listdir(out_dir)
    except OSError as e:
        raise RunDirError(f"cannot read {out_dir}: {e.strerror or e}") from None
    if any(MANIFEST_RE.match(e) for e in entries):
        return
    foreign = sorted(e for e in entries if scope_of(e) is _NOT_OURS and not e.startswith("."))
    if foreign:
        raise RunDirError(
            f"{out_dir} is not empty and is not a twotower output directory "
            f"(no {MANIFEST}; found {', '.join(foreign[:3])}); choose an empty or new directory"
        )


def _layout(tag: str | None | object) -> str:
    return "an unpartitioned run" if tag is None else f"task {tag}"
