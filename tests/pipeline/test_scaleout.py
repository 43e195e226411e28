"""Scale-out (issue #7): `--num-shards/--shard-index` job arrays through the CLI, and `--ray`.

The job-array tests and the driver's commit logic run without Ray. The tests marked `ray` start
one local Ray instance for the module (`ray.init(num_cpus=2)`, real worker processes, no
local_mode) and skip when the `ray` extra is not installed; deselect them with `-m "not ray"`
(they are also marked `slow`).
Everything runs on a random tiny checkpoint with 8 new tokens per row.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from twotower_cli.cli import app
from twotower_cli.io.partition import Partition, shard_of
from twotower_cli.pipeline import RunConfig, generate
from twotower_cli.ray_pipeline import FAULT_ENV, RayDecoder, RayOptions, actor_placement

FAST = ["--block", "4", "--max-new-tokens", "8", "--max-batch-rows", "4", "-q"]
RAY = ["--ray", "--ray-actors", "2", "--ray-batch-rows", "4"]
VOLATILE = ("latency_s", "created_at")  # differ between any two runs
runner = CliRunner()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """24 prompts of mixed lengths, one malformed line and one duplicate id (both rejected)."""
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("src") / "p.jsonl"
    with open(p, "wb") as f:
        for i in range(24):
            text = "".join(rng.choice("0123456789+-*=ab ") for _ in range(rng.randint(2, 24)))
            f.write(orjson.dumps({"id": f"r{i}", "prompt": text}) + b"\n")
            if i == 10:
                f.write(b"{not json\n")
        f.write(orjson.dumps({"id": "r3", "prompt": "again"}) + b"\n")
    return p


N_ROWS, N_REJECTED = 24, 2


@pytest.fixture(scope="module")
def local_out(model_dir, source, tmp_path_factory) -> Path:
    """The reference: one plain local run."""
    out = tmp_path_factory.mktemp("local") / "out"
    summary(gen(model_dir, source, out))
    return out


def gen(model_dir: Path, source: Path, out: Path, *args: str, code: int = 0):
    r = runner.invoke(app, ["gen", str(source), "-o", str(out), "--model", str(model_dir), *FAST, *args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        raise AssertionError("".join(traceback.format_exception(r.exception))) from r.exception
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    return r


def summary(r) -> dict:
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # stdout is the JSON summary alone (Ray's chatter goes to stderr)
    return json.loads(lines[0])


def one_line_error(r) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def rows_by_id(out: Path) -> dict[str, dict]:
    """Every row of every `part-*.parquet` (as duckdb/polars glob them); fails on a duplicate id."""
    files = sorted(str(p) for p in out.glob("part-*.parquet"))
    rows = pads.dataset(files, format="parquet").to_table().to_pylist()
    ids = Counter(r["id"] for r in rows)
    assert not [i for i, n in ids.items() if n > 1], "duplicate ids"
    return {r["id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def stats(out: Path) -> dict:
    r = runner.invoke(app, ["stats", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    # the counts of the rows, not how they were produced (shard files, timing, task bookkeeping)
    return {k: v for k, v in s.items() if k not in ("out_dir", "shards", "latency_s", "throughput", "complete",
                                                    "partition")}


# ---- job arrays (no Ray) --------------------------------------------------------------------------


def test_job_array_union_exactly_once_and_stats(model_dir, source, local_out, tmp_path):
    out = tmp_path / "out"
    s0 = summary(gen(model_dir, source, out, "--num-shards", "2", "--shard-index", "0", "--rows-per-shard", "3"))
    s1 = summary(gen(model_dir, source, out, "--num-shards", "2", "--shard-index", "1", "--rows-per-shard", "3"))
    assert s0["rows_written"] + s1["rows_written"] == N_ROWS and s0["rows_written"] and s1["rows_written"]
    assert s0["rows_rejected"] + s1["rows_rejected"] == N_REJECTED  # each reject logged by one task
    assert s0["shard"] == {"index": 0, "count": 2, "rows_other_shards": s1["rows_written"] + s1["rows_rejected"]}
    assert s0["errors_file"].endswith(".errors-s0000-of-0002.jsonl")
    names = {p.name for p in out.glob("part-*.parquet")}
    assert all(n.startswith(("part-s0000-of-0002-", "part-s0001-of-0002-")) for n in names) and len(names) >= 4
    # a rerun of task 1 has nothing to do, and writes nothing twice
    s1b = summary(gen(model_dir, source, out, "--num-shards", "2", "--shard-index", "1", "--rows-per-shard", "3"))
    assert s1b["rows_written"] == 0 and s1b["rows_skipped_done"] == s1["rows_written"]
    got = rows_by_id(out)
    assert got == rows_by_id(local_out)  # the union is the unpartitioned run, row for row
    for f in out.glob("part-*.parquet"):  # each row is in its owner's shards
        owner = int(f.name[len("part-s"):].split("-")[0])
        assert {shard_of(i, 2) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()} <= {owner}
    drop = ("fingerprint",)  # which has num_shards
    assert {k: v for k, v in stats(out).items() if k not in drop} == \
        {k: v for k, v in stats(local_out).items() if k not in drop}  # rows, rejects, modes, tokens of the union
    full = json.loads(runner.invoke(app, ["stats", str(out), "--json"]).stdout)
    assert full["complete"] is True and full["partition"] == {"num_shards": 2, "tasks_started": 2,
                                                              "tasks_complete": 2}
    # another N in the same directory is refused, with one line
    r = gen(model_dir, source, out, "--num-shards", "3", "--shard-index", "0", code=2)
    assert "--num-shards 2" in one_line_error(r)


@pytest.mark.parametrize("flags, msg", [
    (["--num-shards", "4"], "give both or neither"),
    (["--shard-index", "0"], "give both or neither"),
    (["--num-shards", "0", "--shard-index", "0"], ">= 1"),
    (["--num-shards", "4", "--shard-index", "4"], "[0, 3]"),
    (["--num-shards", "4", "--shard-index", "-1"], "[0, 3]"),
])
def test_shard_flags_exit_2_one_line(model_dir, source, tmp_path, flags, msg):
    r = gen(model_dir, source, tmp_path / "out", *flags, code=2)
    assert msg in one_line_error(r)
    assert not (tmp_path / "out").exists()


def test_ray_flag_without_ray_installed(model_dir, source, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = gen(model_dir, source, tmp_path / "out", "--ray", code=2)
    assert "pip install 'twotower-cli[ray]'" in one_line_error(r)


def test_actor_gpus_and_devices_follow_the_placement():
    assert actor_placement(None, None, None) == (0, None, None, None)
    assert actor_placement("cpu", None, None) == (0, "cpu", None, None)
    assert actor_placement("cuda", None, None) == (1, "cuda:0", None, None)
    assert actor_placement("cuda:3", None, None) == (1, "cuda:0", None, None)  # the actor's own GPU
    assert actor_placement(None, "cuda:2", "cuda:3") == (2, None, "cuda:0", "cuda:1")  # the two-device split
    assert actor_placement(None, "cuda:0", "cuda") == (1, None, "cuda:0", "cuda:0")
    assert actor_placement(None, "cpu", "cuda:1") == (1, None, "cpu", "cuda:0")


def test_ray_error_becomes_one_line():
    from twotower_cli.ray_pipeline import root_cause

    class ActorDiedError(Exception):
        pass

    text = ("The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker.__init__()"
            "\x1b[39m (pid=1)\nTraceback (most recent call last):\n  File \"x.py\", line 1, in __init__\n"
            "RuntimeError: the checkpoint at /m on this node differs from the driver's\n")
    want = "RuntimeError: the checkpoint at /m on this node differs from the driver's"
    assert root_cause(ActorDiedError(text)) == want
    assert root_cause(ActorDiedError("lost\nnode")) == "ActorDiedError: lost node"


def test_driver_commit_drops_redelivered_rows(tmp_path):
    """A retried Ray task whose first attempt also delivered: the driver keeps one copy. The
    actors' batches are replayed through RayDecoder.unpack and the shared run loop, without Ray."""

    def batch(*ids):
        recs = [{"id": i, "prompt": "p", "completion": "c", "created_at": "2026-01-01T00:00:00+00:00",
                 "completion_tokens": 2, "_steps": 1} for i in ids]
        kinds = ["row"] * len(ids) + ["rejected", "counters"]
        payloads = [orjson.dumps(r) for r in recs] + [
            orjson.dumps({"line_no": 9, "id": None, "reason": "malformed JSON", "raw": "{"}),
            orjson.dumps({"denoiser_calls": 3})]
        return pa.table({"kind": kinds, "payload": payloads})

    class Replay(RayDecoder):
        def __enter__(self):  # no Ray to join
            return self

        def __exit__(self, *exc):
            return None

        def decode(self, rows, signals, is_done):
            list(rows)  # submitted, as RayDecoder does first
            for b in (batch("a", "b", "c"), batch("b", "c", "d")):
                yield from self.unpack(b, is_done)

    src = tmp_path / "in.jsonl"  # the rows to do (the replayed batches stand for their decoding)
    src.write_bytes(b"".join(orjson.dumps({"id": i, "prompt": "p"}) + b"\n" for i in "abcd"))
    cfg = RunConfig(source=str(src), out_dir=tmp_path / "out", model=None, tokenizer=None, model_name="m",
                    model_fingerprint="f", rows_per_shard=2)
    s = generate(cfg, Replay(None, cfg, RayOptions(model_path=tmp_path), lambda _m: None))
    assert s["rows_written"] == 4 and s["ray"]["duplicates_dropped"] == 2 and s["denoiser_calls"] == 6
    assert s["exit_code"] == 0 and s["complete"] and "error" not in s
    assert sorted(rows_by_id(tmp_path / "out")) == ["a", "b", "c", "d"]
    assert s["rows_rejected"] == 2  # the same reject delivered twice is logged once (ErrorLog dedup)
    assert len((tmp_path / "out" / ".errors.jsonl").read_text().splitlines()) == 1


# ---- Ray ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own, on import
def test_ray_two_actors_equal_local_and_resume_a_partial_run(ray_local, model_dir, source, local_out, tmp_path):
    """Two actors, four-row batches: the same rows as the local run. The directory starts with a
    partial local run (as a driver crash leaves it): the Ray run skips what is committed."""
    out = tmp_path / "out"
    summary(gen(model_dir, source, out, "--limit", "9"))  # r0..r8
    s = summary(gen(model_dir, source, out, *RAY))
    assert s["rows_written"] == N_ROWS - 9 and s["rows_skipped_done"] == 9 and s["exit_code"] == 0
    assert s["ray"]["batches"] == 4 and s["ray"]["duplicates_dropped"] == 0 and s["complete"]
    assert rows_by_id(out) == rows_by_id(local_out)
    assert stats(out) == stats(local_out)
    # and a rerun of the Ray command has nothing to do: it never starts Ray
    s2 = summary(gen(model_dir, source, out, *RAY))
    assert s2["rows_written"] == 0 and s2["rows_skipped_done"] == N_ROWS and s2["nothing_to_do"]
    assert "ray" not in s2


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own, on import
def test_ray_actor_killed_mid_run_every_id_once(ray_local, model_dir, source, local_out, tmp_path, monkeypatch):
    """The actor holding r13's batch dies (os._exit) after decoding it, once; Ray restarts it and
    retries the batch. Combined with a job-array shard, so that the two features meet."""
    marker = tmp_path / "died"
    monkeypatch.setenv(FAULT_ENV, f"r13:{marker}")
    out = tmp_path / "out"
    part = Partition(shard_of("r13", 2), 2)
    s = summary(gen(model_dir, source, out, *RAY, "--num-shards", "2", "--shard-index", str(part.index)))
    assert marker.exists()  # the actor did die
    assert s["exit_code"] == 0 and s["complete"]
    want = {i: r for i, r in rows_by_id(local_out).items() if shard_of(i, 2) == part.index}
    assert rows_by_id(out) == want  # every id of the shard exactly once, equal to the local run
