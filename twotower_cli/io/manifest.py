"""One output directory = one run: lock, fingerprint, done ids, and crash recovery on open.

Layout of `out/`:
    part-00000.parquet ...   committed shards: the only visible files, and the source of truth
    .manifest.json           fingerprint, shard list, counts (replaced atomically)
    .errors.jsonl            rejected rows (see writer.ErrorLog)
    .lock                    flock'ed while a run writes; holds pid/host/start for the message
    .part-00003.parquet.tmp  an uncommitted shard (only while writing, or after a crash)

Why the sidecars are hidden: `datasets.load_dataset("parquet", data_dir=out)` reads every
non-hidden file of the directory as Parquet (an `errors.jsonl` or `_errors.jsonl` makes it fail),
and `pyarrow.dataset(out)` skips only names starting with "." or "_"; a leading dot satisfies
both. duckdb and polars are pointed at `out/*.parquet` (polars refuses a bare directory that
holds files with other extensions, hidden ones included).

Crash safety. The rename of a shard is its commit; the done set is rebuilt from the committed
shards' `id` column (column projection, so it is fast), never from a journal that could disagree
with them. The manifest is written first at open (so a directory with shards always has one) and
rewritten after each commit, but it only caches the shard list and counts: a crash between a
rename and the manifest update leaves a committed shard that the next open adopts; a crash
before the rename leaves a .tmp that the next open deletes, and those rows are simply not done.
So a crash at any instant loses no committed row and a resume writes no row twice (the writer
refuses ids in the done set).
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import META_FINGERPRINT, SCHEMA_VERSION
from .writer import SHARD_RE, TMP_SUFFIX, ErrorLog, ShardInfo, ShardWriter, atomic_write_bytes, fsync_dir

MANIFEST = ".manifest.json"
ERRORS = ".errors.jsonl"
LOCK = ".lock"
MANIFEST_FORMAT = "twotower-run"


class RunDirError(Exception):
    """The output directory cannot be used for this run (the CLI exits 2 with this one line)."""


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


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Differing fields of two fingerprints, nested dicts flattened to dotted keys."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(a.keys() | b.keys())
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

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK
        self._fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
            since = f" since {holder['started_at']}" if holder and "started_at" in holder else ""
            raise LockError(f"{self.path.parent} is locked by {who}{since}: another run is writing it") from None
        except OSError as e:
            os.close(fd)
            raise RunDirError(f"cannot lock {self.path}: {e.strerror or e}") from None
        self.stale = _read_holder(fd) or None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, orjson.dumps(me) + b"\n", 0)
        os.fsync(fd)
        self._fd = fd

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
    run-level decoding parameters). A different one raises FingerprintMismatch, unless
    `overwrite=True`, which deletes this directory's outputs (shards, errors, manifest state; never
    foreign files) and starts afresh. `notes` lists what recovery did, for the CLI to print.
    Use as a context manager, or call `close()`; `close(complete=True)` marks the run finished.
    """

    def __init__(
        self,
        out_dir: str | Path,
        fingerprint: dict[str, Any],
        *,
        overwrite: bool = False,
        rows_per_shard: int = 10_000,
        row_group_rows: int = 1_000,
    ):
        self.out_dir = Path(out_dir)
        self.fingerprint = normalize_fingerprint(fingerprint)
        self.notes: list[str] = []
        self.done_ids: set[str] = set()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create {self.out_dir}: {e.strerror or e}") from None
        self._lock = RunLock(self.out_dir)
        self._lock.acquire()
        try:
            if self._lock.stale:
                s = self._lock.stale
                self.notes.append(f"took over the lock of pid {s.get('pid')} on {s.get('host')}, which is gone")
            self._open(overwrite)
            self.errors = ErrorLog(self.out_dir / ERRORS)
            self.writer = ShardWriter(
                self.out_dir,
                {META_FINGERPRINT: orjson.dumps(self.fingerprint, option=orjson.OPT_SORT_KEYS).decode()},
                rows_per_shard,
                row_group_rows,
                start_index=self._next_index,
                done=self.done_ids,
                on_commit=self._on_commit,
            )
        except BaseException:
            self._lock.release()
            raise
        self._closed = False

    # ---- public ---------------------------------------------------------------------------------
    def is_done(self, row_id: str) -> bool:
        """Committed in a shard, or already written to the open shard by this process."""
        return row_id in self.done_ids or self.writer.is_pending(row_id)

    def add(self, record: dict[str, Any]) -> None:
        self.writer.add(record)

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
        self.close(complete=False)

    # ---- open / recover -------------------------------------------------------------------------
    def _open(self, overwrite: bool) -> None:
        entries = sorted(os.listdir(self.out_dir))
        removed = [e for e in entries if e.startswith(".") and e.endswith(TMP_SUFFIX)]
        for e in removed:
            (self.out_dir / e).unlink(missing_ok=True)
        if removed:
            fsync_dir(self.out_dir)
            self.notes.append(f"removed {len(removed)} uncommitted temporary file(s) left by a crash")
        entries = [e for e in entries if e not in removed]
        manifest, bad_manifest = self._load_manifest()
        ours = {e for e in entries if SHARD_RE.match(e) or e in (MANIFEST, ERRORS, LOCK)}
        ours |= {e for e in entries if e.startswith(".part-") and e.endswith(".corrupt")}
        # Hidden entries that are not ours (.DS_Store, .nfs*) are invisible to loaders: ignore them.
        foreign = [e for e in entries if e not in ours and not e.startswith(".")]
        if manifest is not None and any(e.endswith(".parquet") for e in foreign):
            self.notes.append("other *.parquet files in the directory will be picked up by dataset loaders")
        if manifest is None:
            if foreign:
                raise RunDirError(
                    f"{self.out_dir} is not empty and is not a twotower output directory "
                    f"(no {MANIFEST}; found {', '.join(foreign[:3])}); choose an empty or new directory"
                )
            if (ours - {LOCK}) and not overwrite:
                why = f"its {MANIFEST} is unreadable ({bad_manifest})" if bad_manifest else f"it has no {MANIFEST}"
                raise RunDirError(f"{self.out_dir} holds twotower outputs but {why}; pass --overwrite")
        elif not overwrite:
            if manifest.get("schema_version") != SCHEMA_VERSION:
                raise RunDirError(
                    f"{self.out_dir} was written with output schema version {manifest.get('schema_version')}; "
                    f"this version writes {SCHEMA_VERSION}: use another output directory or --overwrite"
                )
            diffs = fingerprint_diff(manifest.get("fingerprint") or {}, self.fingerprint)
            if diffs:
                raise FingerprintMismatch(self.out_dir, diffs)
        if overwrite and (ours - {LOCK}):
            self._clear(sorted(ours - {LOCK, MANIFEST}))
            manifest = None
        if manifest is None:
            manifest = {"format": MANIFEST_FORMAT, "schema_version": SCHEMA_VERSION,
                        "fingerprint": self.fingerprint, "created_at": _now(), "shards": []}
        manifest["complete"] = False  # until this run's close(complete=True)
        self._manifest = manifest
        self._recover_shards()
        self._save()

    def _load_manifest(self) -> tuple[dict[str, Any] | None, str | None]:
        p = self.out_dir / MANIFEST
        try:
            m = orjson.loads(p.read_bytes())
        except FileNotFoundError:
            return None, None
        except (OSError, orjson.JSONDecodeError) as e:
            return None, str(e)
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            return None, "not a twotower manifest"
        return m, None

    def _clear(self, names: list[str]) -> None:
        """--overwrite. Shards go first, the manifest is replaced last: a crash midway leaves the
        old run's manifest with a subset of its shards, itself a valid resumable state."""
        for n in names:
            (self.out_dir / n).unlink(missing_ok=True)
        fsync_dir(self.out_dir)
        self.notes.append(f"--overwrite: removed {len(names)} file(s) of the previous run")

    def _recover_shards(self) -> None:
        """Rebuild done ids from the committed shards; reconcile the manifest's shard list."""
        listed = {s["name"]: s for s in self._manifest.get("shards", [])}
        present = sorted(e for e in os.listdir(self.out_dir) if SHARD_RE.match(e))
        indices = [int(m.group(1)) for n in (*present, *listed) if (m := SHARD_RE.match(n))]
        self._next_index = max(indices, default=-1) + 1
        shards, dupes = [], 0
        for name in present:
            path = self.out_dir / name
            try:
                with pq.ParquetFile(path) as pf:  # the id column only: fast even for big shards
                    ids = pf.read(columns=["id"]).column("id").to_pylist()
            except (pa.ArrowException, OSError, KeyError, ValueError) as e:
                aside = path.with_name(f".{name}.corrupt")
                os.replace(path, aside)
                fsync_dir(self.out_dir)
                self.notes.append(f"{name} is unreadable ({e}); moved to {aside.name}, its rows will be redone")
                continue
            before = len(self.done_ids)
            self.done_ids.update(ids)
            dupes += len(ids) - (len(self.done_ids) - before)
            if name not in listed:
                self.notes.append(f"adopted {name}, committed just before an interruption")
            shards.append({"name": name, "rows": len(ids), "bytes": path.stat().st_size})
        for name in sorted(set(listed) - set(present)):
            self.notes.append(f"{name} is listed in {MANIFEST} but missing; its rows will be redone")
        if dupes:
            self.notes.append(f"{dupes} id(s) appear in more than one shard (files were copied in by hand?)")
        self._manifest["shards"] = shards

    # ---- commits ----------------------------------------------------------------------------------
    def _on_commit(self, info: ShardInfo) -> None:
        self.errors.sync()  # the manifest's `rejected` count never exceeds what is durable
        self._manifest["shards"].append({"name": info.name, "rows": info.rows, "bytes": info.bytes})
        self._save()

    def _save(self) -> None:
        m = self._manifest
        m["rows"] = sum(s["rows"] for s in m["shards"])
        m["rejected"] = self.errors.count if hasattr(self, "errors") else m.get("rejected", 0)
        m["updated_at"] = _now()
        atomic_write_bytes(self.out_dir / MANIFEST, orjson.dumps(m, option=orjson.OPT_INDENT_2))
