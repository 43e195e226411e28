"""The run directory's hardening: foreign directories untouched, write failures and hand-edited
sidecars as one line, content-keyed error records."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import orjson
import pytest

from twotower_cli.errors import UserError
from twotower_cli.io import durable
from twotower_cli.io.rundir import ERRORS, MANIFEST, RunDir, RunDirError
from twotower_cli.io.schema import RejectedRow
from twotower_cli.io.stats import read_run
from twotower_cli.io.writer import ErrorLog, read_errors

FP = {"model": "tiny@0123", "decode": {"gamma": 0.8}}


def rec(i) -> dict:
    return {"id": str(i), "prompt": f"p{i}", "completion": f"c{i}"}


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_directory_is_refused_and_left_byte_identical(tmp_path, overwrite):
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".x.tmp").write_bytes(b"precious")
    (home / ".part-00000.parquet.tmp").write_bytes(b"looks like ours, but the directory is not")
    (home / ".config" / "a.tmp").write_bytes(b"a")
    (home / "notes.txt").write_text("hello")
    before = snapshot(home)
    mtime = home.stat().st_mtime_ns
    with pytest.raises(RunDirError, match="not a twotower output directory") as e:
        RunDir(home, FP, overwrite=overwrite)
    assert "\n" not in str(e.value)
    assert snapshot(home) == before  # nothing removed, changed or added (not even .lock)
    assert home.stat().st_mtime_ns == mtime


def test_own_tmp_files_removed_only_in_our_directory(tmp_path):
    out = tmp_path / "out"
    with RunDir(out, FP) as rd:
        rd.add(rec(1))
    (out / ".x.tmp").write_bytes(b"not ours")
    (out / ".part-00005.parquet.tmp").write_bytes(b"ours, torn")
    rd = RunDir(out, FP)
    rd.close()
    assert (out / ".x.tmp").read_bytes() == b"not ours" and not (out / ".part-00005.parquet.tmp").exists()


# ---- write failures: one line, committed shards kept -------------------------------------------


def _fail_with(code):
    def boom(*a, **k):
        raise OSError(code, os.strerror(code))
    return boom


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES])
def test_shard_write_failure_is_one_line_and_keeps_committed_shards(tmp_path, monkeypatch, code):
    out = tmp_path / "out"
    rd = RunDir(out, FP, rows_per_shard=2, row_group_rows=1)
    for i in range(3):
        rd.add(rec(i))
    import pyarrow.parquet as pq
    monkeypatch.setattr(pq.ParquetWriter, "write_table", _fail_with(code))
    with pytest.raises(RunDirError) as e, rd:
        rd.add(rec(3))
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert ".part-00001.parquet.tmp" in msg and os.strerror(code) in msg and "committed shards are kept" in msg
    monkeypatch.undo()
    rd = RunDir(out, FP)  # resumable: the committed shard is there, the torn one is not
    assert "0" in rd.done_ids and "1" in rd.done_ids and "2" not in rd.done_ids
    rd.close()


def test_manifest_and_errors_write_failures_are_one_line(tmp_path, monkeypatch):
    out = tmp_path / "out"
    rd = RunDir(out, FP, rows_per_shard=1)
    monkeypatch.setattr(durable.os, "replace", _fail_with(errno.ENOSPC))
    with pytest.raises(RunDirError, match=rf"cannot write {out / MANIFEST}: No space left.*committed shards are kept"):
        rd._save()
    monkeypatch.undo()
    log = ErrorLog(out / ".errors-test.jsonl")
    monkeypatch.setattr(durable.os, "fsync", _fail_with(errno.ENOSPC))
    log.add(RejectedRow(1, None, "bad", "x"))
    with pytest.raises(RunDirError, match=r"\.errors-test\.jsonl: No space left"):
        log.sync()
    monkeypatch.undo()
    rd.close()


def test_readonly_directory_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def ro_open(path, flags, *a):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(RunDirError, match=r"cannot write .*\.lock: Read-only file system"):
        RunDir(out, FP)


# ---- hand-edited manifests and errors files ----------------------------------------------------


@pytest.mark.parametrize("edit", [
    {"shards": "all of them"}, {"shards": [{"name": 3}]}, {"shards": [1, 2]}, {"shards": None},
    {"rows": "many", "rejected": [1], "created_at": 5, "complete": "yes"},
])
def test_manifest_with_a_malformed_cache_is_recovered(tmp_path, edit):
    out = tmp_path / "out"
    with RunDir(out, FP, rows_per_shard=2) as rd:
        for i in range(5):
            rd.add(rec(i))
    m = orjson.loads((out / MANIFEST).read_bytes())
    (out / MANIFEST).write_bytes(orjson.dumps({**m, **edit}))
    rd = RunDir(out, FP)
    assert len(rd.done_ids) == 5
    rd.close()
    m = orjson.loads((out / MANIFEST).read_bytes())
    assert m["rows"] == 5 and [s["name"] for s in m["shards"]] == [f"part-0000{i}.parquet" for i in range(3)]
    assert read_run(out)["rows"] == 5


@pytest.mark.parametrize("bad", [b"[]", b'"x"', b'{"format": "twotower-run", "fingerprint": [1]}',
                                 b'{"format": "twotower-run", "schema_version": "2"}', b"{", b"\xff\xfe"])
def test_manifest_of_the_wrong_shape_is_one_line(tmp_path, bad):
    out = tmp_path / "out"
    with RunDir(out, FP) as rd:
        rd.add(rec(1))
    (out / MANIFEST).write_bytes(bad)
    with pytest.raises(RunDirError, match="unreadable.*--overwrite") as e:
        RunDir(out, FP)
    assert "\n" not in str(e.value)
    RunDir(out, FP, overwrite=True).close()


def test_errors_file_of_the_wrong_shape_is_read(tmp_path):
    out = tmp_path / "out"
    RunDir(out, FP).close()
    (out / ERRORS).write_bytes(b'{"line_no": "x", "reason": ["a"], "id": 5, "raw": {"k": 1}}\n[1, 2]\n"s"\n'
                               b'{"reason": "bad", "raw": "", "id": null}\n{"id": "k", "raw": null}\n')
    rd = RunDir(out, FP)
    assert rd.errors.count == 3
    assert rd.reject(RejectedRow(1, None, "bad", "")) is None  # the file's {"reason": "bad"} is this one
    rd.reject(RejectedRow(2, None, "other", "x"))
    rd.close()
    assert len(list(read_errors(out / ERRORS))) == 4 and read_run(out)["rejected"] == 4


# ---- error records keyed by content ------------------------------------------------------------


def test_error_records_are_keyed_by_content_not_line(tmp_path):
    p = tmp_path / ".errors.jsonl"
    bad = [RejectedRow(3, None, "malformed JSON", "{a"), RejectedRow(5, None, "malformed JSON", "{a"),
           RejectedRow(9, "k", "duplicate id", '{"id": "k"}')]
    log = ErrorLog(p)
    assert all(log.add(r) for r in bad)  # two identical bad lines are two records
    assert not log.add(bad[0])  # the same row delivered again (a retried task): once
    log.close()
    log = ErrorLog(p)  # a line was inserted at the top: every line number moved by one
    assert not any(log.add(RejectedRow(r.line_no + 1, r.id, r.reason, r.raw)) for r in bad)
    assert log.add(RejectedRow(20, None, "malformed JSON", "{a"))  # a third such line is new
    log.close()
    assert ErrorLog(p).count == 4


# ---- real processes (slow) ---------------------------------------------------------------------

EFBIG_CHILD = """
import resource, sys
from twotower_cli.errors import UserError
from twotower_cli.io.rundir import RunDir
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    with RunDir(sys.argv[1], {"m": 1}, rows_per_shard=50, row_group_rows=10) as rd:
        for i in range(10**6):
            rd.add({"id": str(i), "prompt": "p" * 2000 + str(i), "completion": str(i) * 900})
except UserError as e:
    print("USERERROR", e)
"""


@pytest.mark.slow
def test_file_size_limit_is_one_line_and_the_run_resumes(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", EFBIG_CHILD, str(out)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    line = p.stdout.strip()
    assert line.startswith("USERERROR cannot write") and "File too large" in line
    assert "committed shards are kept" in line
    rd = RunDir(out, {"m": 1})  # every committed shard reads whole and resumes
    assert len(rd.done_ids) % 50 == 0 and len(rd.done_ids) > 0
    rd.close()
