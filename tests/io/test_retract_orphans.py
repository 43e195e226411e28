"""RunDir.orphans (committed rows no input row asked for) and RunDir.retract (committed rows
removed from their shards, to be written again): exactly once per key at every crash point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower_cli.io import rundir as rundir_mod
from twotower_cli.io.formats import line_key, record_from_line
from twotower_cli.io.partition import Partition, shard_of
from twotower_cli.io.rundir import MANIFEST, Layout, RunDir, split_key
from twotower_cli.io.schema import META_FINGERPRINT, sample_key
from twotower_cli.io.stats import read_run

FP = {"model": "tiny@0123", "decode": {"gamma": 0.8}}
FORMATS = ["parquet", "jsonl", "openai"]
EXT = {"parquet": "parquet", "jsonl": "jsonl", "openai": "jsonl"}
ROOT = Path(__file__).resolve().parents[2]
ALL = [(str(i), k) for i in range(10) for k in range(3)]  # 30 rows: ids 0..9, samples 0..2


def row(i, k: int = 0, version: str = "old") -> dict:
    return {"id": str(i), "sample_index": k, "prompt": f"p{i}", "completion": f"{version} {i}.{k}",
            "mode": "diffusion", "completion_tokens": 3, "finish_reason": "eos",
            "input_hash": f"{int(i) * 7 + 1 + (version != 'old'):016x}"}


def old_hash(i) -> int:
    return int(i) * 7 + 1


@pytest.fixture(autouse=True)
def small_line_groups(monkeypatch):
    """JSON-lines shards in DoneSet groups of 4 lines (1,000 by default), so that a shard has
    several, as a Parquet one of row groups of 3 does."""
    monkeypatch.setattr(rundir_mod, "LINE_GROUP_ROWS", 4)


def write_run(out: Path, fmt: str, pairs=ALL, **kw) -> None:
    with RunDir(out, FP, format=fmt, rows_per_shard=kw.pop("rows_per_shard", 7), row_group_rows=3, **kw) as run:
        for i, k in pairs:
            run.add(row(i, k))
        run.close(complete=True)


def shards(out: Path, fmt: str) -> list[Path]:
    return sorted(out.glob(f"part-*.{EXT[fmt]}"))


def read_rows(out: Path, fmt: str) -> list[dict]:
    rows: list[dict] = []
    for p in shards(out, fmt):
        if fmt == "parquet":
            rows += pq.read_table(p).to_pylist()
        else:
            rows += [record_from_line(line, fmt) for line in p.read_bytes().splitlines()]
    return rows


def keys(rows) -> list[tuple[str, int]]:
    return sorted((r["id"], r["sample_index"]) for r in rows)


def manifest(out: Path) -> dict:
    return orjson.loads((out / MANIFEST).read_bytes())


def shard_keys(p: Path, fmt: str) -> list[str]:
    if fmt == "parquet":
        t = pq.read_table(p, columns=["id", "sample_index"])
        return [sample_key(i, k) for i, k in zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist())]
    return [line_key(line, fmt) for line in p.read_bytes().splitlines()]


def check_manifest(out: Path, fmt: str) -> None:
    """The manifest lists exactly the shards, with their true row counts, and no pending record."""
    m = manifest(out)
    assert "rewrites" not in m
    assert {s["name"]: s["rows"] for s in m["shards"]} == {p.name: len(shard_keys(p, fmt)) for p in shards(out, fmt)}
    assert m["rows"] == sum(s["rows"] for s in m["shards"])


def die(run: RunDir) -> None:
    """What a kill -9 leaves: nothing closed or saved; only the kernel's locks go."""
    run._lock.release()
    run.errors._f.close()


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".lock")}


# ---- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row_id", ["a", "", "x y", "ü\U0001f600", "0\x01"])
@pytest.mark.parametrize("k", [0, 1, 12])
def test_split_key_inverts_sample_key(row_id, k):
    assert split_key(sample_key(row_id, k)) == (row_id, k)


# ---- orphans ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_orphans_are_the_committed_rows_no_lookup_found(tmp_path, fmt):
    out = tmp_path / "out"
    write_run(out, fmt)
    run = RunDir(out, FP, format=fmt, rows_per_shard=7)
    assert run.orphan_count() == 30  # nothing asked for yet
    asked = [(str(i), k) for i in range(6) for k in range(2)]
    for i, k in asked:
        assert run.committed_input(sample_key(i, k)) == old_hash(i)
    assert run.is_done(sample_key("6", 2))  # is_done looks up too
    assert run.committed_input(sample_key("99", 0)) is None and run.committed_input(sample_key("3", 5)) is None
    for i in (20, 21):  # this run's rows: never orphans
        run.add(row(i, 0))
        run.add(row(i, 1))
    run.checkpoint()
    want = sorted(set(ALL) - set(asked) - {("6", 2)})
    got = list(run.orphans())
    assert sorted(got) == want and len(got) == len(want) == 17
    assert all(isinstance(k, int) for _, k in got)
    assert run.orphan_count() == 17
    assert run.committed_input(sample_key("9", 2)) == old_hash(9)
    assert run.orphan_count() == 16 and ("9", 2) not in set(run.orphans())
    run.close()
    run = RunDir(out, FP, format=fmt)  # a new run: nothing asked for yet, this time 34 rows
    assert run.orphan_count() == 34 and len(set(run.orphans())) == 34
    run.close()


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_key_in_two_shards_is_one_orphan_and_retracted_from_both(tmp_path, fmt):
    out = tmp_path / "out"
    write_run(out, fmt, pairs=ALL[:6], rows_per_shard=3)
    (out / f"part-00007.{EXT[fmt]}").write_bytes((out / f"part-00000.{EXT[fmt]}").read_bytes())  # copied by hand
    run = RunDir(out, FP, format=fmt)
    assert run.done_ids.duplicates == 3 and len(run.done_ids) == 6 == run.rows_committed
    assert run.orphan_count() == 6 and sorted(run.orphans()) == ALL[:6]
    assert run.committed_input(sample_key("0", 1)) == old_hash(0)  # both copies found
    assert run.orphan_count() == 5 and ("0", 1) not in set(run.orphans())
    assert run.retract([sample_key("0", 1)]) == 2  # both rows
    assert len(run.done_ids) == 5 and run.orphan_count() == 5
    run.add(row(0, 1, "new"))
    run.close()
    assert sorted(keys(read_rows(out, fmt))).count(("0", 1)) == 1
    check_manifest(out, fmt)


# ---- retraction --------------------------------------------------------------------------------------

GONE = [("1", 0), ("1", 1), ("1", 2), ("4", 2), ("9", 0)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_retract_then_write_again_keeps_every_key_once(tmp_path, fmt):
    out = tmp_path / "out"
    write_run(out, fmt)
    before = {p.name: p.read_bytes() for p in shards(out, fmt)}
    run = RunDir(out, FP, format=fmt, rows_per_shard=7)
    gone = {sample_key(i, k) for i, k in GONE}
    assert run.retract([*sorted(gone), sample_key("77", 0), sample_key("1", 9)]) == 5
    assert run.rows_committed == 25 == manifest(out)["rows"]
    check_manifest(out, fmt)
    assert not [e for e in os.listdir(out) if e.endswith((".tmp", ".corrupt"))]
    for i, k in ALL:  # the others are still found, in the rewritten shards' regrouped rows
        want = None if sample_key(i, k) in gone else old_hash(i)
        assert run.committed_input(sample_key(i, k)) == want
        assert run.is_done(sample_key(i, k)) is (want is not None)
    assert sorted(run.orphans()) == []  # every remaining row was asked for just now
    for p in shards(out, fmt):  # the kept rows, untouched and in order
        ks = shard_keys(p, fmt)
        if fmt == "parquet":
            was = pa.BufferReader(before[p.name])
            old = pq.read_table(was).to_pylist()
            kept = [r for r in old if sample_key(r["id"], r["sample_index"]) not in gone]
            assert pq.read_table(p).to_pylist() == kept
            md, old_md = pq.read_metadata(p), pq.read_metadata(was)
            assert pq.read_schema(p).metadata == pq.read_schema(was).metadata
            assert META_FINGERPRINT.encode() in pq.read_schema(p).metadata
            assert all(md.row_group(g).column(c).compression == "ZSTD"
                       for g in range(md.num_row_groups) for c in range(md.num_columns))
            assert md.num_row_groups <= old_md.num_row_groups
            assert all(0 < md.row_group(g).num_rows <= 3 for g in range(md.num_row_groups))
        else:
            old_lines = before[p.name].splitlines(keepends=True)
            assert p.read_bytes() == b"".join(ln for ln in old_lines if line_key(ln, fmt) not in gone)
        assert not set(ks) & gone
    for i, k in GONE:  # the writer takes them again, once
        run.add(row(i, k, "new"))
        with pytest.raises(ValueError, match="already written"):
            run.add(row(i, k, "new"))
    assert run.rows_committed == 25  # pending in the open shard
    with pytest.raises(ValueError, match="written by this run"):
        run.retract([sample_key("9", 0)])  # pending in the open shard
    run.checkpoint()
    assert run.rows_committed == 30
    with pytest.raises(ValueError, match="written by this run"):
        run.retract([sample_key("9", 0)])  # committed by this run
    assert run.committed_input(sample_key("9", 0)) is None and run.is_done(sample_key("9", 0))
    run.close(complete=True)

    run = RunDir(out, FP, format=fmt)  # a resume: every key once, the retracted ones in their new version
    assert run.notes == [] and len(run.done_ids) == 30
    rows = read_rows(out, fmt)
    assert keys(rows) == sorted(ALL)
    assert all(r["completion"].startswith("new" if (r["id"], r["sample_index"]) in GONE else "old") for r in rows)
    run.close(complete=True)
    check_manifest(out, fmt)
    assert read_run(out)["rows"] == 30


@pytest.mark.parametrize("fmt", ["parquet", "openai"])
def test_a_shard_emptied_by_retraction_is_removed(tmp_path, fmt):
    out = tmp_path / "out"
    write_run(out, fmt, rows_per_shard=3)  # 10 shards of 3 rows
    first = {p.name: p.read_bytes() for p in shards(out, fmt)}
    run = RunDir(out, FP, format=fmt)
    name = f"part-00001.{EXT[fmt]}"
    victims = shard_keys(out / name, fmt)
    assert run.retract(victims) == 3
    assert not (out / name).exists() and name not in [s["name"] for s in manifest(out)["shards"]]
    assert {p.name: p.read_bytes() for p in shards(out, fmt)} == {n: b for n, b in first.items() if n != name}
    check_manifest(out, fmt)
    assert run.retract([sample_key(i, k) for i, k in ALL]) == 27  # every shard goes
    assert shards(out, fmt) == [] and manifest(out)["rows"] == 0 and len(run.done_ids) == 0
    run.close()
    assert len(shards(out, fmt)) == 1 and read_run(out)["rows"] == 0  # the empty shard of an empty run
    run = RunDir(out, FP, format=fmt)
    assert run.notes == [] and len(run.done_ids) == 0
    run.close()


def test_retract_of_keys_not_committed_changes_nothing(tmp_path):
    out = tmp_path / "out"
    write_run(out, "jsonl")
    run = RunDir(out, FP, format="jsonl")
    before = snapshot(out)
    assert run.retract([]) == 0
    assert run.retract([sample_key("77", 0), sample_key("3", 3), "3\x00", sample_key("3", 2) + "x"]) == 0
    assert snapshot(out) == before and run.rows_committed == 30
    run.add(row(50))
    with pytest.raises(ValueError, match="written by this run"):  # checked first: nothing retracted
        run.retract([sample_key("2", 0), sample_key("50", 0)])
    assert run.is_done(sample_key("2", 0)) and snapshot(out) == before
    run.close()


def test_a_task_retracts_from_its_own_shards_only(tmp_path):
    out = tmp_path / "out"
    for part in (Partition(0, 2), Partition(1, 2)):
        write_run(out, "parquet", pairs=[(i, k) for i, k in ALL if shard_of(i, 2) == part.index],
                  partition=part, rows_per_shard=4)
    theirs = {p.name: p.read_bytes() for p in out.glob("part-s0000-of-0002-*")}
    run = RunDir(out, FP, partition=Partition(1, 2))
    mine = [sample_key(i, k) for i, k in ALL if shard_of(i, 2) == 1]
    assert run.retract([sample_key(i, k) for i, k in ALL]) == len(mine)
    run.close()
    assert {p.name: p.read_bytes() for p in out.glob("part-s0000-of-0002-*")} == theirs
    assert not list(out.glob("part-s0001-of-0002-*.parquet")) or all(
        pq.read_metadata(p).num_rows == 0 for p in out.glob("part-s0001-of-0002-*.parquet"))


# ---- a crash at each step of a retraction ---------------------------------------------------------


class Crash(BaseException):
    """A process dying at this instant: no handler runs (a BaseException no `except Exception` takes)."""


def crash_at(monkeypatch, step: str, target: Path) -> None:
    """Make the retraction die at `step` of rewriting (or removing) shard `target`."""
    real_replace, real_unlink, real_save = os.replace, os.unlink, RunDir._save

    def replace(src, dst, *a, **kw):
        if Path(dst) == target and step == "before rename":
            raise Crash
        real_replace(src, dst, *a, **kw)
        if Path(dst) == target and step == "after rename":
            raise Crash

    def unlink(path, *a, **kw):
        if Path(path) == target and step == "before unlink":
            raise Crash
        real_unlink(path, *a, **kw)
        if Path(path) == target and step == "after unlink":
            raise Crash

    def save(self):
        if step == "before record" and self._manifest.get("rewrites"):
            raise Crash  # the filtered copy is written, the manifest does not know yet
        real_save(self)

    monkeypatch.setattr(rundir_mod.os, "replace", replace)
    monkeypatch.setattr(rundir_mod.os, "unlink", unlink)
    monkeypatch.setattr(RunDir, "_save", save)


STEPS = [  # (step, whether the shard is emptied, whether the rows are gone after it)
    ("before record", False, False),
    ("before rename", False, False),
    ("after rename", False, True),
    ("before unlink", True, False),
    ("after unlink", True, True),
]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize(("step", "emptied", "gone_after"), STEPS)
def test_a_crash_at_each_step_of_a_retraction_keeps_every_key_at_most_once(tmp_path, monkeypatch, fmt, step,
                                                                          emptied, gone_after):
    out = tmp_path / "out"
    write_run(out, fmt)  # shards of 7 rows: 0-3 full, 4 with 2
    name = f"part-00001.{EXT[fmt]}"
    target = out / name
    in_shard = shard_keys(target, fmt)
    victims = in_shard if emptied else in_shard[1:4]
    run = RunDir(out, FP, format=fmt, rows_per_shard=7)
    with monkeypatch.context() as mp:
        crash_at(mp, step, target)
        with pytest.raises(Crash):
            run.retract(victims)
    die(run)
    m = manifest(out)
    tmp = out / Layout.tmp(name)
    tmp_left = step in ("before record", "before rename")
    assert tmp.exists() is tmp_left  # the crash left its temporary file
    assert ("rewrites" in m) is (step != "before record")
    if "rewrites" in m:
        assert m["rewrites"] == {name: [7, 0 if emptied else 4]}
    assert target.exists() is (step != "after unlink")
    assert (name in [s["name"] for s in m["shards"]]) is (not emptied)  # unlinked only once not listed

    run = RunDir(out, FP, format=fmt, rows_per_shard=7)  # the resume
    assert not [e for e in os.listdir(out) if e.endswith((".corrupt", ".tmp"))]
    assert not any("does not read whole" in n or "missing" in n for n in run.notes), run.notes
    assert any("removed 1 uncommitted temporary file" in n for n in run.notes) is tmp_left
    assert [n for n in run.notes if "interrupted retraction" in n] == ([] if step == "before record" else [
        f"removed {name}: an interrupted retraction of its 7 row(s) was completed" if step == "after unlink"
        else f"{name}: an interrupted retraction of {len(victims)} row(s) "
        + ("was completed" if gone_after else "did not happen; they stay committed")])
    assert len(run.notes) == tmp_left + (step != "before record")
    committed = keys(read_rows(out, fmt))
    assert len(committed) == len(set(committed))  # at most once
    victim_pairs = {split_key(k) for k in victims}
    assert set(committed) == set(ALL) - (victim_pairs if gone_after else set())  # no other row lost
    assert len(run.done_ids) == len(committed)
    check_manifest(out, fmt)
    # the run loop: changed rows still committed are retracted again; then every victim is written anew
    assert run.retract([sample_key(i, k) for i, k in sorted(victim_pairs)]) == (0 if gone_after else len(victims))
    for i, k in sorted(victim_pairs):
        run.add(row(i, k, "new"))
    run.close(complete=True)
    rows = read_rows(out, fmt)
    assert keys(rows) == sorted(ALL)
    assert {(r["id"], r["sample_index"]) for r in rows if r["completion"].startswith("new")} == victim_pairs
    check_manifest(out, fmt)


def test_a_record_with_neither_count_is_still_damage(tmp_path):
    """The pending record widens what recovery accepts to its two counts, not to any count."""
    out = tmp_path / "out"
    write_run(out, "jsonl")
    m = manifest(out)
    m["rewrites"] = {"part-00001.jsonl": [9, 4]}
    (out / MANIFEST).write_bytes(orjson.dumps(m))
    run = RunDir(out, FP, format="jsonl")
    assert any("part-00001.jsonl does not read whole" in n for n in run.notes)
    assert (out / ".part-00001.jsonl.corrupt").exists() and len(run.done_ids) == 23
    run.close()


RETRACT_CHILD = textwrap.dedent("""
    import sys
    from twotower_cli.io.rundir import RunDir
    run = RunDir(sys.argv[1], {"m": 1})
    assert run.committed_input("1") is not None
    assert run.retract(["2", "3"]) == 2 and run.orphan_count() == 37 and len(list(run.orphans())) == 37
    run.close()
    print("pandas" in sys.modules)
""")


def test_retraction_does_not_import_pandas(tmp_path):
    """The run loop retracts during a resume, whose memory must not carry pandas (35 MB)."""
    with RunDir(tmp_path / "out", {"m": 1}, rows_per_shard=16, row_group_rows=4) as run:
        for i in range(40):
            run.add(row(i))
    p = subprocess.run([sys.executable, "-c", RETRACT_CHILD, str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
