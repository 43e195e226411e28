"""RunDir in every format (parquet, jsonl, openai), rows keyed by (id, sample_index), and typed
pass-through columns: resume after a kill, damaged shards, refusals, layouts."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower_cli.io import writer as writer_mod
from twotower_cli.io.formats import record_from_line
from twotower_cli.io.partition import Partition, shard_of
from twotower_cli.io.rundir import (
    MANIFEST,
    Layout,
    RunDir,
    RunDirError,
    _verify_lines,
    _verify_shard,
    id_hashes,
)
from twotower_cli.io.schema import output_schema, sample_key
from twotower_cli.io.stats import read_run

FP = {"model": "tiny@0123", "decode": {"gamma": 0.8}}
FORMATS = ["parquet", "jsonl", "openai"]
EXT = {"parquet": "parquet", "jsonl": "jsonl", "openai": "jsonl"}
ROOT = Path(__file__).resolve().parents[2]


def rec(i, k: int = 0, **kw) -> dict:
    r = {"id": str(i), "sample_index": k, "prompt": f"p{i}", "completion": f"c{i}.{k}", "mode": "diffusion",
         "completion_tokens": 4, "tokens_per_step": 2.0, "latency_s": 0.1, "finish_reason": "eos",
         "input_hash": f"{int(i) * 7 + 1:016x}"}
    r.update(kw)
    return r


def read_rows(out: Path, fmt: str, extra=()) -> list[dict]:
    """Every committed row of the directory, shard by shard, as records."""
    rows: list[dict] = []
    for p in sorted(out.glob(f"part-*.{EXT[fmt]}")):
        if fmt == "parquet":
            rows += pq.read_table(p).to_pylist()
        else:
            rows += [record_from_line(line, fmt, extra) for line in p.read_bytes().splitlines()]
    return rows


def keys(rows) -> list[tuple[str, int]]:
    return sorted((r["id"], r["sample_index"]) for r in rows)


def manifest(out: Path) -> dict:
    return orjson.loads((out / MANIFEST).read_bytes())


def die(run: RunDir) -> None:
    """What a kill -9 leaves: nothing closed, nothing committed; only the kernel's locks go."""
    run._lock.release()
    run.errors._f.close()


# ---- a kill, then a resume: every (id, sample_index) exactly once --------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_kill_then_resume_writes_every_sample_exactly_once(tmp_path, fmt):
    out = tmp_path / "out"
    want = [(str(i), k) for i in range(12) for k in range(3)]
    run = RunDir(out, FP, format=fmt, rows_per_shard=5, row_group_rows=2)
    for i, k in want[:10]:
        run.add(rec(i, k))  # shards 0 and 1: committed, in the manifest
    run.writer.on_commit = None  # the process dies between shard 2's rename and the manifest update
    for i, k in want[10:18]:
        run.add(rec(i, k))  # shard 2 renamed; shard 3 open with 3 rows
    tmp = out / Layout.tmp(f"part-00003.{EXT[fmt]}")
    assert tmp.exists() and (out / f"part-00002.{EXT[fmt]}").exists()
    assert run.is_done("5") and run.is_done(sample_key("5", 2))  # pending in the open shard
    assert not run.is_done("6")
    die(run)
    assert [s["name"] for s in manifest(out)["shards"]] == [f"part-0000{n}.{EXT[fmt]}" for n in (0, 1)]

    run = RunDir(out, FP, format=fmt, rows_per_shard=5)
    assert any("removed 1 uncommitted" in n for n in run.notes) and not tmp.exists()
    assert any(f"adopted part-00002.{EXT[fmt]}" in n for n in run.notes)
    done = {sample_key(i, k) for i, k in want[:15]}
    assert set(run.done_ids) == done and len(run.done_ids) == 15  # keys read back from the shards
    assert not run.is_done("5") and not run.is_done(sample_key("5", 2))  # lost with the open shard
    assert run.committed_input(sample_key("3", 2)) == 3 * 7 + 1 and run.committed_input(sample_key("3", 9)) is None
    with pytest.raises(ValueError, match="id '0' sample 2 was already written"):
        run.add(rec(0, 2))
    todo = [(i, k) for i, k in want if not run.is_done(sample_key(i, k))]
    assert todo == want[15:]
    for i, k in todo:
        run.add(rec(i, k))
    run.close(complete=True)
    rows = read_rows(out, fmt)
    assert keys(rows) == sorted(want) and len(rows) == len(want)  # nothing lost, nothing twice
    assert all(r["completion"] == f"c{r['id']}.{r['sample_index']}" for r in rows)
    m = manifest(out)
    assert m["rows"] == 36 and m["complete"] is True and m["shard_format"] == fmt
    assert not any(e.endswith(".tmp") for e in os.listdir(out))
    assert read_run(out)["rows"] == 36


KILL_CHILD = textwrap.dedent("""
    import sys
    from twotower_cli.io.rundir import RunDir
    from twotower_cli.io.schema import sample_key
    run = RunDir(sys.argv[1], {"m": 1}, rows_per_shard=7, row_group_rows=3, format=sys.argv[2])
    print("READY", flush=True)
    for i in range(10**9):
        for k in range(2):
            if not run.is_done(sample_key(str(i), k)):
                run.add({"id": str(i), "sample_index": k, "prompt": "p", "completion": "c" * 50})
""")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_real_kill_9_mid_write_then_resume(tmp_path, fmt):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(out), fmt], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert p.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 60
        while not (out / "part-00003.jsonl").exists():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.01)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    committed = keys(read_rows(out, fmt))
    assert len(committed) == len(set(committed)) and len(committed) % 7 == 0
    run = RunDir(out, {"m": 1}, rows_per_shard=7, format=fmt)
    assert len(run.done_ids) == len(committed)
    n = len(committed) // 2 + 10
    for i in range(n):
        for k in range(2):
            if not run.is_done(sample_key(str(i), k)):
                run.add({"id": str(i), "sample_index": k, "prompt": "p", "completion": "c"})
    run.close(complete=True)
    assert keys(read_rows(out, fmt)) == sorted((str(i), k) for i in range(n) for k in range(2))


# ---- damaged JSON-lines shards: set aside, their rows redone -------------------------------------


def _cut(b: bytes) -> bytes:
    return b[:-7]  # the last line loses its end (and its newline)


def _garbage(b: bytes) -> bytes:
    lines = b.splitlines(keepends=True)
    return lines[0] + b"{not json\n" + b"".join(lines[2:])


def _line_lost(b: bytes) -> bytes:
    return b"".join(b.splitlines(keepends=True)[:-1])  # whole lines, but not the recorded count


def _bad_value(b: bytes) -> bytes:
    return b.replace(b'"completion_tokens":4', b'"completion_tokens":"4"', 1)


def _blank_line(b: bytes) -> bytes:
    return b"\n" + b


def _newline_lost(b: bytes) -> bytes:
    return b[:-1]  # every line whole, but the file does not end where a committed shard ends


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
@pytest.mark.parametrize("damage", [_cut, _garbage, _line_lost, _bad_value, _blank_line, _newline_lost])
def test_damaged_line_shard_is_set_aside_and_its_rows_redone(tmp_path, fmt, damage):
    out = tmp_path / "out"
    with RunDir(out, FP, format=fmt, rows_per_shard=3) as run:
        for i in range(9):
            run.add(rec(i))
    victim = out / "part-00001.jsonl"
    before = victim.read_bytes()
    victim.write_bytes(damage(before))
    assert victim.read_bytes() != before
    run = RunDir(out, FP, format=fmt, rows_per_shard=3)
    assert any("part-00001.jsonl does not read whole" in n and ".part-00001.jsonl.corrupt" in n for n in run.notes)
    assert not victim.exists() and (out / ".part-00001.jsonl.corrupt").read_bytes() == damage(before)
    assert sorted(run.done_ids, key=int) == ["0", "1", "2", "6", "7", "8"]
    assert run.writer.next_index == 3
    for i in range(9):
        if not run.is_done(str(i)):
            run.add(rec(i))
    run.close()
    assert keys(read_rows(out, fmt)) == sorted((str(i), 0) for i in range(9))
    assert read_run(out)["rows"] == 9


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_line_shard_write_failure_is_one_line_and_resumes(tmp_path, monkeypatch, fmt):
    out = tmp_path / "out"
    rd = RunDir(out, FP, format=fmt, rows_per_shard=2, row_group_rows=1)
    for i in range(3):
        rd.add(rec(i))

    def full(self, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_mod._LinesShard, "write", full)
    with pytest.raises(RunDirError) as e, rd:
        rd.add(rec(3))
    assert "\n" not in str(e.value) and ".part-00001.jsonl.tmp" in str(e.value) and "No space left" in str(e.value)
    monkeypatch.undo()
    assert not (out / ".part-00001.jsonl.tmp").exists()
    rd = RunDir(out, FP, format=fmt)
    assert sorted(rd.done_ids) == ["0", "1"]
    rd.close()


# ---- one format per directory; the same refusals and layouts in each ----------------------------


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != ".lock"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_manifest_records_the_format_and_another_is_refused(tmp_path, fmt):
    out = tmp_path / "out"
    with RunDir(out, FP, format=fmt) as run:
        run.add(rec(1))
    assert manifest(out)["shard_format"] == fmt and (out / f"part-00000.{EXT[fmt]}").exists()
    before = snapshot(out)
    for other in FORMATS:
        if other != fmt:
            with pytest.raises(RunDirError, match=f"holds {fmt} shards; this run writes {other}.*--overwrite"):
                RunDir(out, FP, format=other)
    assert snapshot(out) == before  # refused runs touched nothing
    other = next(f for f in FORMATS if EXT[f] != EXT[fmt])
    with RunDir(out, FP, format=other, overwrite=True) as run:
        assert len(run.done_ids) == 0
        run.add(rec(2))
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-00000.{EXT[other]}"]
    assert keys(read_rows(out, other)) == [("2", 0)] and manifest(out)["shard_format"] == other
    with pytest.raises(ValueError, match="unknown output format"):
        RunDir(tmp_path / "new", FP, format="csv")


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_foreign_and_manifestless_directories_refused(tmp_path, fmt):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="not a twotower output directory"):
        RunDir(home, FP, format=fmt, overwrite=True)
    assert sorted(os.listdir(home)) == ["notes.jsonl"]
    lost = tmp_path / "lost"
    with RunDir(lost, FP, format=fmt) as run:
        run.add(rec(1))
    (lost / MANIFEST).unlink()
    with pytest.raises(RunDirError, match="no .manifest.json"):
        RunDir(lost, FP, format=fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_an_empty_line_run_is_one_empty_shard(tmp_path, fmt):
    out = tmp_path / "out"
    RunDir(out, FP, format=fmt).close(complete=True)
    assert (out / "part-00000.jsonl").read_bytes() == b""
    run = RunDir(out, FP, format=fmt)
    assert run.notes == [] and len(run.done_ids) == 0
    run.close()
    s = read_run(out)
    assert s["rows"] == 0 and s["shards"] == 1 and s["format"] == fmt


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_partitioned_line_runs(tmp_path, fmt):
    out = tmp_path / "out"
    ids = range(30)
    for part in (Partition(0, 2), Partition(1, 2)):
        with RunDir(out, FP, partition=part, format=fmt, rows_per_shard=4) as run:
            for i in ids:
                if shard_of(str(i), 2) == part.index:
                    for k in range(2):
                        run.add(rec(i, k))
            (out / Layout.tmp(f"part-{part.tag}-00099.jsonl")).write_bytes(b"{")  # its own crash leftover
            run.close(complete=True)
    names = sorted(p.name for p in out.glob("part-*"))
    assert names and all(n.startswith(("part-s0000-of-0002-", "part-s0001-of-0002-")) and n.endswith(".jsonl")
                         for n in names)
    run = RunDir(out, FP, partition=Partition(1, 2), format=fmt)
    assert any("removed 1 uncommitted" in n for n in run.notes)
    assert (out / Layout.tmp("part-s0000-of-0002-00099.jsonl")).exists()  # another task's: kept
    assert set(run.done_ids) == {sample_key(str(i), k) for i in ids if shard_of(str(i), 2) == 1 for k in range(2)}
    run.close(complete=True)
    assert keys(read_rows(out, fmt)) == sorted((str(i), k) for i in ids for k in range(2))
    s = read_run(out)
    assert s["rows"] == 60 and s["complete"] is True and s["partition"]["tasks_complete"] == 2


# ---- keys: the done set's hashes are those of (id, sample_index) --------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_verification_hashes_the_row_keys(tmp_path, fmt):
    out = tmp_path / "out"
    records = [rec(i, k) for i in range(5) for k in (0, 1, 7)]
    with RunDir(out, FP, format=fmt, rows_per_shard=100, row_group_rows=4) as run:
        for r in records:
            run.add(r)
    path = out / f"part-00000.{EXT[fmt]}"
    if fmt == "parquet":
        groups, rows = _verify_shard(path, output_schema().remove_metadata())
        assert len(groups) == 4  # one per row group
    else:
        groups, rows = _verify_lines(path, fmt, ())
    assert rows == 15
    got = np.concatenate([h for _, h, _ in groups])
    assert got.tolist() == id_hashes([sample_key(r["id"], r["sample_index"]) for r in records]).tolist()
    assert sample_key("1", 7) == "1\x007" and sample_key("1", 0) == "1"
    inputs = np.concatenate([x for _, _, x in groups])
    assert inputs.tolist() == [int(r["input_hash"], 16) for r in records]


# ---- typed pass-through columns ------------------------------------------------------------------

T0 = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=timezone.utc)
EXTRA = [
    pa.field("n", pa.int64()), pa.field("score", pa.float64()), pa.field("ok", pa.bool_()),
    pa.field("tag", pa.string()), pa.field("when", pa.timestamp("us", tz="UTC")),
    pa.field("ids", pa.list_(pa.int64())),
    pa.field("info", pa.struct([("a", pa.string()), ("b", pa.int32()), ("c", pa.list_(pa.float64()))])),
]


def typed(i: int) -> dict:
    return {"n": i * 10**12, "score": i / 3, "ok": i % 2 == 1, "tag": f"t{i}", "when": T0 + timedelta(hours=i),
            "ids": [i, -1, 2**62], "info": {"a": f"a{i}", "b": -i, "c": [0.25, float(i)]}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_pass_through_columns_round_trip(tmp_path, fmt):
    out = tmp_path / "out"
    records = [rec(i, **typed(i)) for i in range(4)] + [rec(9)]  # row 9: every pass-through null
    with RunDir(out, FP, format=fmt, extra_fields=EXTRA, rows_per_shard=2) as run:
        for r in records:
            run.add(r)
        with pytest.raises(ValueError, match="column 'ids' cannot hold"):
            run.add(rec(20, ids=["x"]))
        with pytest.raises(ValueError, match="unknown output column"):
            run.add(rec(21, not_a_column=1))
    assert manifest(out)["extra_fields"] == [[f.name, str(f.type)] for f in EXTRA]
    rows = read_rows(out, fmt, EXTRA)
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "9"]
    for r, want in zip(rows, [typed(i) for i in range(4)] + [dict.fromkeys(typed(0))], strict=True):
        assert {f.name: r[f.name] for f in EXTRA} == want
    assert list(rows[0])[-len(EXTRA):] == [f.name for f in EXTRA]
    if fmt == "parquet":
        schema = pq.read_schema(out / "part-00000.parquet")
        assert schema.equals(output_schema(extra=EXTRA), check_metadata=False)
        assert schema.field("info").type == EXTRA[-1].type and schema.field("when").type == EXTRA[4].type
    run = RunDir(out, FP, format=fmt, extra_fields=EXTRA)  # a resume verifies against the same schema
    assert run.notes == [] and len(run.done_ids) == 5
    run.close()


def test_a_shard_of_other_pass_through_columns_is_not_adopted(tmp_path):
    """The fingerprint (made by the caller) refuses another column set first; without it, the
    verification still never adopts a shard whose schema is not this run's."""
    out = tmp_path / "out"
    with RunDir(out, FP, extra_fields=EXTRA) as run:
        run.add(rec(1, **typed(1)))
    run = RunDir(out, FP, extra_fields=EXTRA[:3])
    assert any("does not read whole (its columns are not this version's output schema)" in n for n in run.notes)
    assert len(run.done_ids) == 0
    run.close()


PANDAS_CHILD = textwrap.dedent("""
    import sys
    from twotower_cli.io.rundir import RunDir
    for out, fmt in zip(sys.argv[1::2], sys.argv[2::2]):
        run = RunDir(out, {"m": 1}, format=fmt)
        assert len(run.done_ids) == 40 and run.notes == [], run.notes
        run.close()
    print("pandas" in sys.modules)
""")


def test_a_resume_does_not_import_pandas(tmp_path):
    """pyarrow imports pandas (35 MB) for Array.to_numpy and pa.array of Python lists; a resume's
    peak memory must not carry it (benchmarks/done_set.py)."""
    args = []
    for fmt in ("parquet", "jsonl"):
        with RunDir(tmp_path / fmt, {"m": 1}, format=fmt, rows_per_shard=16) as run:
            for i in range(20):
                for k in range(2):
                    run.add(rec(i, k))
        args += [str(tmp_path / fmt), fmt]
    p = subprocess.run([sys.executable, "-c", PANDAS_CHILD, *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
