"""RunDir: resume, crash recovery, fingerprint checks, the lock, and read_run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from twotower_cli.io.rundir import (
    ERRORS,
    MANIFEST,
    FingerprintMismatch,
    Layout,
    LockError,
    RunDir,
    RunDirError,
)
from twotower_cli.io.schema import RejectedRow
from twotower_cli.io.stats import read_run, render_summary
from twotower_cli.io.writer import ShardWriter, read_errors

FP = {"model": {"name": "tiny", "checkpoint": "sha256:0123"}, "mode": "diffusion", "gamma": 0.8, "block_size": 16}
ROOT = Path(__file__).resolve().parents[2]


def rec(i, **kw) -> dict:
    r = {"id": str(i), "prompt": f"p{i}", "completion": f"c{i}", "mode": "diffusion",
         "tokens_per_step": 2.0, "latency_s": 0.1, "completion_tokens": 4, "finish_reason": "eos"}
    r.update(kw)
    return r


def all_ids(out) -> list[str]:
    return ds.dataset(out, format="parquet").to_table(columns=["id"])["id"].to_pylist()


def manifest(out) -> dict:
    return orjson.loads((Path(out) / MANIFEST).read_bytes())


def test_fresh_run_then_resume_skips_done(tmp_path):
    out = tmp_path / "out"
    with RunDir(out, FP, rows_per_shard=4) as run:
        for i in range(10):
            run.add(rec(i))
        run.errors.add(RejectedRow(11, None, "malformed JSON", "{"))
    m = manifest(out)
    assert m["rows"] == 10 and m["rejected"] == 1 and [s["rows"] for s in m["shards"]] == [4, 4, 2]
    assert m["fingerprint"] == FP and m["complete"] is False

    run = RunDir(out, dict(FP))
    assert run.notes == [] and set(run.done_ids) == {str(i) for i in range(10)}
    todo = [i for i in range(15) if not run.is_done(str(i))]
    assert todo == list(range(10, 15))
    for i in todo:
        run.add(rec(i))
        assert run.is_done(str(i))
    run.errors.add(RejectedRow(11, None, "malformed JSON", "{"))  # re-read row: not logged twice
    run.close(complete=True)
    assert sorted(all_ids(out), key=int) == [str(i) for i in range(15)]
    m = manifest(out)
    assert m["complete"] is True and m["rows"] == 15 and m["rejected"] == 1
    assert len(list(read_errors(out / ERRORS))) == 1
    assert not (out / ".lock").read_bytes()  # clean release empties the holder note


def test_crash_leftovers_recovered(tmp_path):
    """A partial .tmp and a committed shard the manifest never heard of (crash after the rename)."""
    out = tmp_path / "out"
    with RunDir(out, FP, rows_per_shard=5) as run:
        for i in range(5):
            run.add(rec(i))
    # part-00001: renamed (committed) but the process died before updating the manifest.
    with ShardWriter(out, names=Layout(), start_index=1) as w:
        for i in range(5, 9):
            w.add(rec(i))
    # .part-00002.parquet.tmp: a shard being written when the process died (truncated bytes).
    good = (out / "part-00001.parquet").read_bytes()
    (out / ".part-00002.parquet.tmp").write_bytes(good[: len(good) // 2])
    (out / ("." + MANIFEST + ".tmp")).write_bytes(b'{"torn')
    assert [s["name"] for s in manifest(out)["shards"]] == ["part-00000.parquet"]

    run = RunDir(out, FP, rows_per_shard=5)
    assert not any(e.endswith(".tmp") for e in os.listdir(out))
    assert any("removed 2 uncommitted" in n for n in run.notes)
    assert any("adopted part-00001.parquet" in n for n in run.notes)
    assert set(run.done_ids) == {str(i) for i in range(9)}
    assert [s["name"] for s in run.manifest["shards"]] == ["part-00000.parquet", "part-00001.parquet"]
    for i in range(12):
        if not run.is_done(str(i)):
            run.add(rec(i))
    run.close()
    ids = all_ids(out)
    assert sorted(ids, key=int) == [str(i) for i in range(12)]  # nothing lost, nothing twice
    assert sorted(e for e in os.listdir(out) if e.endswith(".parquet")) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert manifest(out)["rows"] == 12


def test_missing_and_corrupt_shards(tmp_path):
    out = tmp_path / "out"
    with RunDir(out, FP, rows_per_shard=2) as run:
        for i in range(6):
            run.add(rec(i))
    (out / "part-00001.parquet").unlink()
    (out / "part-00002.parquet").write_bytes(b"garbage")
    run = RunDir(out, FP)
    assert set(run.done_ids) == {"0", "1"}
    assert any("part-00001.parquet is listed" in n for n in run.notes)
    assert any("part-00002.parquet does not read whole" in n for n in run.notes)
    assert (out / ".part-00002.parquet.corrupt").exists()
    assert run.writer.next_index == 3  # never reuses a name that was once committed
    run.close()
    assert sorted(all_ids(out)) == ["0", "1"]


def test_fingerprint_mismatch_then_overwrite(tmp_path):
    out = tmp_path / "out"
    with RunDir(out, FP) as run:
        run.add(rec(1))
        run.errors.add(RejectedRow(2, None, "bad", ""))
    other = {**FP, "gamma": 0.9, "model": {"name": "tiny", "checkpoint": "sha256:ffff"}}
    with pytest.raises(FingerprintMismatch) as e:
        RunDir(out, other)
    assert e.value.diffs == {"gamma": (0.8, 0.9), "model.checkpoint": ("sha256:0123", "sha256:ffff")}
    msg = str(e.value)
    assert "gamma: 0.8 -> 0.9" in msg and "model.checkpoint" in msg and "--overwrite" in msg
    assert "\n" not in msg
    with pytest.raises(FingerprintMismatch, match="temperature: <absent> -> 0.0"):
        RunDir(out, {**FP, "temperature": 0.0})
    assert all_ids(out) == ["1"]  # refused runs touched nothing

    (out / ".user-notes").write_text("keep me")
    with RunDir(out, other, overwrite=True) as run:
        assert set(run.done_ids) == set() and run.errors.count == 0
        assert any("--overwrite" in n for n in run.notes)
        run.add(rec(7))
    assert all_ids(out) == ["7"] and (out / ".user-notes").read_text() == "keep me"
    assert manifest(out)["fingerprint"] == other and manifest(out)["rejected"] == 0
    assert list(read_errors(out / ERRORS)) == []
    RunDir(out, other).close()  # resumable with the new fingerprint


def test_refuses_foreign_or_manifestless_directory(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("a,b\n")
    with pytest.raises(RunDirError, match="not a twotower output directory"):
        RunDir(foreign, FP)
    with pytest.raises(RunDirError, match="not a twotower output directory"):
        RunDir(foreign, FP, overwrite=True)  # never deletes files it did not write
    hidden_only = tmp_path / "hidden"
    hidden_only.mkdir()
    (hidden_only / ".DS_Store").write_bytes(b"")
    RunDir(hidden_only, FP).close()
    lost = tmp_path / "lost"
    with RunDir(lost, FP) as run:
        run.add(rec(1))
    (lost / MANIFEST).unlink()
    with pytest.raises(RunDirError, match="no .manifest.json"):
        RunDir(lost, FP)
    RunDir(lost, FP, overwrite=True).close()
    assert all_ids(lost) == []  # the zero-row shard keeps the directory loadable
    with pytest.raises(RunDirError, match="cannot create"):
        RunDir(lost / "part-00000.parquet" / "sub", FP)


def test_schema_version_mismatch_refused(tmp_path):
    out = tmp_path / "out"
    RunDir(out, FP).close()
    m = manifest(out)
    m["schema_version"] = "0"
    (out / MANIFEST).write_bytes(orjson.dumps(m))
    with pytest.raises(RunDirError, match="schema version 0"):
        RunDir(out, FP)


def test_loaders_see_only_the_shards(tmp_path):
    out = tmp_path / "out"
    run = RunDir(out, FP, rows_per_shard=3, row_group_rows=1)
    for i in range(7):
        run.add(rec(i))
    run.errors.add(RejectedRow(9, None, "bad", "x"))
    # While running: an open .tmp shard, the lock, the manifest and the errors file all exist.
    assert any(e.endswith(".tmp") for e in os.listdir(out))
    assert len(all_ids(out)) == 6
    run.close()
    assert ds.dataset(out, format="parquet").count_rows() == 7
    glob = str(out / "*.parquet")
    duckdb = pytest.importorskip("duckdb")
    assert duckdb.sql(f"select count(distinct id) from read_parquet('{glob}')").fetchall()[0][0] == 7
    pl = pytest.importorskip("polars")
    assert pl.scan_parquet(glob).collect().height == 7


def test_loads_with_hf_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    with RunDir(out, FP, rows_per_shard=2) as run:
        for i in range(5):
            run.add(rec(i))
        run.errors.add(RejectedRow(9, None, "bad", "x"))
    d = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(d["id"]) == [str(i) for i in range(5)]


# ---- locking (real processes: marked slow) --------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    from twotower_cli.io.rundir import RunDir, LockError
    out, action = sys.argv[1], sys.argv[2]
    fp = {"model": {"name": "tiny", "checkpoint": "sha256:0123"}, "mode": "diffusion", "gamma": 0.8,
          "block_size": 16}
    if action == "try":
        try:
            RunDir(out, fp).close()
            print("OPENED")
        except LockError as e:
            print("LOCKED", e)
    elif action == "hold":
        run = RunDir(out, fp)
        print("READY", flush=True)
        time.sleep(60)
    elif action == "write":
        run = RunDir(out, fp, rows_per_shard=7, row_group_rows=3)
        print("READY", flush=True)
        for i in range(10**9):
            if not run.is_done(str(i)):
                run.add({"id": str(i), "prompt": "p", "completion": "c"})
""")


def _child(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True,
                            env=env, **kw)


@pytest.mark.slow
def test_lock_refuses_second_process_and_names_pid(tmp_path):
    out = tmp_path / "out"
    with RunDir(out, FP):
        p = _child(str(out), "try")
        stdout, _ = p.communicate(timeout=60)
        assert stdout.startswith("LOCKED"), stdout
        assert f"pid {os.getpid()}" in stdout
        with pytest.raises(LockError, match=f"pid {os.getpid()}"):
            RunDir(out, FP)  # a second open in the same process is refused too
    p = _child(str(out), "try")
    assert p.communicate(timeout=60)[0].startswith("OPENED")


@pytest.mark.slow
def test_stale_lock_of_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    p = _child(str(out), "hold")
    try:
        assert p.stdout.readline().strip() == "READY"
        with pytest.raises(LockError, match=f"pid {p.pid}"):
            RunDir(out, FP)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    holder = orjson.loads((out / ".lock").read_bytes())
    assert holder["pid"] == p.pid  # the dead process's note is still in the file...
    run = RunDir(out, FP)  # ...but the kernel released its flock
    assert any(f"pid {p.pid}" in n for n in run.notes)
    run.close()


@pytest.mark.slow
def test_kill_9_mid_write_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "out"
    p = _child(str(out), "write")
    try:
        assert p.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 60
        while not (out / "part-00003.parquet").exists():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.01)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    committed = all_ids(out)
    assert len(committed) == len(set(committed)) and len(committed) % 7 == 0
    run = RunDir(out, FP, rows_per_shard=7)
    assert set(run.done_ids) == set(committed)
    n = len(committed) + 10
    for i in range(n):
        if not run.is_done(str(i)):
            run.add({"id": str(i), "prompt": "p", "completion": "c"})
    run.close(complete=True)
    ids = all_ids(out)
    assert sorted(ids, key=int) == [str(i) for i in range(n)]
    assert not any(e.endswith(".tmp") for e in os.listdir(out))
    for f in out.glob("part-*.parquet"):
        pq.read_metadata(f)  # every committed shard is a complete file


# ---- stats ---------------------------------------------------------------------------------------


def test_read_run_summary(tmp_path):
    out = tmp_path / "out"
    with RunDir(out, FP, rows_per_shard=3) as run:
        # AR's steps are its completion tokens (its denoiser_steps column is 0)
        run.add(rec(0, mode="ar", tokens_per_step=1.0, finish_reason="length", latency_s=0.5, denoiser_steps=0))
        run.add(rec(1, mode="diffusion", tokens_per_step=3.5, completion_tokens=14, denoiser_steps=4))
        run.add(rec(2, mode="diffusion", tokens_per_step=5.5, completion_tokens=22, denoiser_steps=4))
        run.add(rec(3, mode="mock-ar", tokens_per_step=None, latency_s=None, denoiser_steps=4))
        run.errors.add(RejectedRow(8, None, "bad", ""))
    s = read_run(out)
    assert s["rows"] == 4 and s["shards"] == 2 and s["rejected"] == 1
    assert s["modes"] == {"diffusion": 2, "mock-ar": 1, "ar": 1}
    assert s["finish_reasons"] == {"eos": 3, "length": 1}
    assert s["completion_tokens"] == 4 + 14 + 22 + 4
    tps = s["tokens_per_step"]
    # One definition everywhere (summary, bench, stats): Σ completion tokens / Σ steps, not the
    # mean of the rows' ratios (which would give diffusion 4.5 only by chance and 10/3 overall)
    assert tps["by_mode"] == {"diffusion": 36 / 8, "mock-ar": 1.0, "ar": 1.0}
    assert tps["mean"] == pytest.approx(44 / 16)
    assert tps["histogram"]["1-1.5"] == 1 and tps["histogram"]["3-4"] == 1 and tps["histogram"]["4-6"] == 1
    assert sum(tps["histogram"].values()) == 3
    assert s["latency_s"]["max"] == 0.5 and s["throughput"]["wall_s"] >= 0.5
    assert s["fingerprint"] == FP and s["complete"] is False
    orjson.dumps(s)  # JSON-able, for `twotower stats --json`
    text = render_summary(s)
    assert "rows        4 in 2 shard(s); rejected 1" in text and "diffusion 2" in text


def test_read_run_refuses_a_directory_without_a_run(tmp_path):
    from twotower_cli.io.rundir import RunDirError

    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="holds no twotower run"):
        read_run(tmp_path / "empty")


def test_read_run_empty_directory(tmp_path):
    RunDir(tmp_path / "out", FP).close(complete=True)
    s = read_run(tmp_path / "out")
    assert s["rows"] == 0 and s["shards"] == 1 and s["complete"] is True
    assert s["tokens_per_step"]["mean"] is None and s["throughput"]["rows_per_s"] is None
    assert "rows        0" in render_summary(s)
