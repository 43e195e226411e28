"""Partitioned runs (job arrays, issue #7) at the RunDir level: the id-hash partition, per-task
names, locks and manifests in one directory, refusals, --overwrite, and `twotower stats` of the
union. The CLI path (`--num-shards/--shard-index`) is tested in test_scaleout.py."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pyarrow.dataset as ds
import pytest

from twotower_cli.io.partition import Partition, from_flags, parse_tag, shard_of
from twotower_cli.io.rundir import FingerprintMismatch, Layout, LockError, RunDir, RunDirError
from twotower_cli.io.schema import PromptRow, RejectedRow
from twotower_cli.io.stats import read_run, render_summary
from twotower_cli.io.writer import read_errors

FP = {"model": "tiny@0123", "decode": {"gamma": 0.8}}


def rec(i) -> dict:
    return {"id": str(i), "prompt": f"p{i}", "completion": f"c{i}", "mode": "diffusion", "completion_tokens": 2,
            "tokens_per_step": 2.0, "latency_s": 0.1}


def write_task(out: Path, part: Partition | None, ids, fp=FP, **kw) -> RunDir:
    with RunDir(out, fp, partition=part, rows_per_shard=3, **kw) as rd:
        for i in ids:
            if part is None or shard_of(str(i), part.count) == part.index:
                rd.add(rec(i))
        rd.errors.add(RejectedRow(1000 + (part.index if part else 0), None, "malformed JSON", "{"))
        rd.close(complete=True)
    return rd


def all_ids(out: Path) -> list[str]:
    return ds.dataset(sorted(map(str, out.glob("part-*.parquet"))), format="parquet").to_table()["id"].to_pylist()


def test_shard_of_is_stable_disjoint_and_covers():
    # Fixed values: the partition must never change across versions, hosts or processes.
    assert [shard_of(f"r{i}", 8) for i in range(8)] == [3, 1, 1, 2, 0, 2, 1, 1]
    keys = [f"r{i}" for i in range(2000)]
    parts = [Partition(i, 4) for i in range(4)]
    rows = [PromptRow(k, n + 1, "p", None) for n, k in enumerate(keys)]
    owners = [[p.index for p in parts if p.owns(r)] for r in rows]
    assert all(len(o) == 1 for o in owners)
    counts = [sum(o == [i] for o in owners) for i in range(4)]
    assert min(counts) > 400  # balanced enough
    # a rejected row without an id is owned through its line number
    rej = RejectedRow(17, None, "malformed JSON")
    assert sum(p.owns(rej) for p in parts) == 1


def test_flags_validation_and_tags():
    assert from_flags(None, None) is None
    assert from_flags(1, 0) is None  # one shard is the whole input: the plain layout
    assert from_flags(8, 3) == Partition(3, 8) and Partition(3, 8).tag == "s0003-of-0008"
    assert Partition(3, 12000).tag == "s00003-of-12000"
    assert parse_tag("s0003-of-0008") == Partition(3, 8) and parse_tag("s0009-of-0008") is None
    for n, i, msg in [(8, None, "go together"), (None, 0, "go together"), (0, 0, ">= 1"), (4, 4, r"\[0, 3\]"),
                      (4, -1, r"\[0, 3\]")]:
        with pytest.raises(ValueError, match=msg):
            from_flags(n, i)


def test_two_tasks_one_directory_union_and_resume(tmp_path):
    out = tmp_path / "out"
    ids = range(40)
    p0, p1 = Partition(0, 2), Partition(1, 2)
    rd0 = write_task(out, p0, ids)
    names = sorted(os.listdir(out))
    assert ".manifest-s0000-of-0002.json" in names and ".lock-s0000-of-0002" in names
    assert all(n.startswith("part-s0000-of-0002-") for n in names if n.endswith(".parquet"))
    assert rd0.manifest["fingerprint"]["num_shards"] == 2 and rd0.manifest["partition"] == {"index": 0, "count": 2}
    s = read_run(out)
    assert s["complete"] is False and s["partition"] == {"num_shards": 2, "tasks_started": 1, "tasks_complete": 1}
    write_task(out, p1, ids)
    got = all_ids(out)
    assert sorted(got, key=int) == [str(i) for i in ids]  # the union, exactly once
    s = read_run(out)
    assert s["rows"] == 40 and s["rejected"] == 2 and s["complete"] is True
    assert s["fingerprint"]["num_shards"] == 2 and "tasks       2 of 2 complete" in render_summary(s)
    assert len(list(read_errors(out / Layout(p1.tag).errors))) == 1
    # resume of task 1 sees only its own done ids, and nothing is written twice
    rd = RunDir(out, FP, partition=p1)
    assert set(rd.done_ids) == {str(i) for i in ids if shard_of(str(i), 2) == 1}
    rd.close(complete=True)
    assert sorted(all_ids(out), key=int) == [str(i) for i in ids]


def test_other_num_shards_or_layout_or_settings_refused(tmp_path):
    out = tmp_path / "out"
    write_task(out, Partition(0, 2), range(10))
    with pytest.raises(RunDirError, match="--num-shards 2; this run has --num-shards 3"):
        RunDir(out, FP, partition=Partition(1, 3))
    with pytest.raises(RunDirError, match="--num-shards 2; this run has no --num-shards"):
        RunDir(out, FP)
    with pytest.raises(FingerprintMismatch, match="decode.gamma"):
        RunDir(out, {**FP, "decode": {"gamma": 0.5}}, partition=Partition(1, 2))
    plain = tmp_path / "plain"
    write_task(plain, None, range(10))
    with pytest.raises(RunDirError, match="holds an unpartitioned run"):
        RunDir(plain, FP, partition=Partition(0, 2))
    assert sorted(all_ids(out), key=int) == sorted((str(i) for i in range(10) if shard_of(str(i), 2) == 0), key=int)


def test_locks_tasks_and_layouts(tmp_path):
    out = tmp_path / "out"
    rd = RunDir(out, FP, partition=Partition(0, 2))
    with pytest.raises(LockError, match="task s0000-of-0002"):
        RunDir(out, FP, partition=Partition(0, 2))
    other = RunDir(out, FP, partition=Partition(1, 2))  # another task: runs alongside
    other.close()
    # an unpartitioned run is refused (other settings), and --overwrite cannot pull a running
    # task's files from under it
    with pytest.raises(RunDirError, match="--num-shards 2"):
        RunDir(out, FP)
    with pytest.raises(LockError, match="task s0000-of-0002"):
        RunDir(out, FP, overwrite=True)
    rd.close()
    plain = RunDir(tmp_path / "plain", FP)  # holds .lock for its whole run
    with pytest.raises(LockError, match="an unpartitioned run"):
        RunDir(tmp_path / "plain", FP, partition=Partition(0, 2))
    plain.close()


def test_open_keeps_other_tasks_tmp_files(tmp_path):
    out = tmp_path / "out"
    write_task(out, Partition(0, 2), range(10))
    theirs = out / ".part-s0001-of-0002-00000.parquet.tmp"  # task 1, mid-write
    mine = out / ".part-s0000-of-0002-00009.parquet.tmp"  # task 0, crashed mid-write
    theirs.write_bytes(b"x")
    mine.write_bytes(b"x")
    rd = RunDir(out, FP, partition=Partition(0, 2))
    assert theirs.exists() and not mine.exists()
    rd.close()
    plain = tmp_path / "plain"
    write_task(plain, None, range(3))
    (plain / ".stray.tmp").write_bytes(b"x")  # of no known layout: not ours, so never removed
    (plain / ".part-00007.parquet.tmp").write_bytes(b"x")  # the unpartitioned layout's own: removed
    RunDir(plain, FP).close()
    assert (plain / ".stray.tmp").read_bytes() == b"x" and not (plain / ".part-00007.parquet.tmp").exists()


def test_overwrite_clears_conflicting_layouts_keeps_same_settings(tmp_path):
    out = tmp_path / "out"
    write_task(out, Partition(0, 2), range(20))
    write_task(out, Partition(1, 2), range(20))
    new = {**FP, "decode": {"gamma": 0.5}}
    # task 0 of a job array rerun with new settings and --overwrite: task 1's old files go too
    write_task(out, Partition(0, 2), range(20), fp=new, overwrite=True)
    assert not (out / Layout("s0001-of-0002").manifest).exists()
    assert sorted(all_ids(out), key=int) == [str(i) for i in range(20) if shard_of(str(i), 2) == 0]
    # task 1 with --overwrite too (every task of the array gets the same flags): task 0's new
    # files have its settings and stay
    write_task(out, Partition(1, 2), range(20), fp=new, overwrite=True)
    assert sorted(all_ids(out), key=int) == [str(i) for i in range(20)]
    m = orjson.loads((out / Layout("s0000-of-0002").manifest).read_bytes())
    assert m["fingerprint"]["decode"]["gamma"] == 0.5
    # an unpartitioned --overwrite replaces the whole partitioned run
    write_task(out, None, range(5), fp=new, overwrite=True)
    assert sorted(all_ids(out), key=int) == [str(i) for i in range(5)]
    assert read_run(out)["partition"] is None


def test_task_files_without_manifest_refused(tmp_path):
    out = tmp_path / "out"
    write_task(out, Partition(0, 2), range(10))
    write_task(out, Partition(1, 2), range(10))
    (out / Layout("s0001-of-0002").manifest).unlink()
    with pytest.raises(RunDirError, match=r"task s0001-of-0002 without a readable \.manifest-s0001-of-0002\.json"):
        RunDir(out, FP, partition=Partition(0, 2))


def test_tasks_of_two_job_arrays_opening_at_once(tmp_path, monkeypatch):
    """Tasks of a 3-way and a 2-way array open an empty directory at the same time, with the
    window between the fingerprint check and the manifest write widened: the check-then-write
    under `.lock` lets only one N in (without that lock, all four get in)."""
    import threading
    import time

    slow = RunDir._recover_shards

    def recover_slowly(self):
        time.sleep(0.3)
        slow(self)

    monkeypatch.setattr(RunDir, "_recover_shards", recover_slowly)
    out = tmp_path / "out"
    out.mkdir()
    results: dict[tuple[int, int], str] = {}
    go = threading.Barrier(4)

    def task(i: int, n: int) -> None:
        go.wait()
        try:
            RunDir(out, FP, partition=Partition(i, n)).close()
            results[i, n] = "ok"
        except RunDirError as e:
            results[i, n] = str(e)

    threads = [threading.Thread(target=task, args=t) for t in [(0, 3), (0, 2), (1, 3), (1, 2)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = {n for (_, n), r in results.items() if r == "ok"}
    assert len(winners) == 1, results
    (n,) = winners
    assert sum(r == "ok" for r in results.values()) == 2, results  # both tasks of the winning array
    assert all("--num-shards" in r for r in results.values() if r != "ok"), results
    manifests = sorted(p.name for p in out.glob(".manifest*"))
    assert len(manifests) == 2 and all(f"-of-000{n}." in m for m in manifests), manifests
