"""The generation controls end to end (`twotower gen`): n samples, stop strings, sampling filters,
metadata pass-through, the repetition signal and the output formats, on a random tiny checkpoint
whose EOS is never proposed (every row runs to its limit unless a stop string ends it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from twotower_cli.cli import app

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
FAST = ["--block", "4", "--max-new-tokens", "12", "--max-batch-rows", "8", "-q"]
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(no_eos_model_dir) -> Path:
    return no_eos_model_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def gen(ckpt: Path, *args: str, code: int = 0, fast: bool = True):
    r = runner.invoke(app, ["gen", *args, "--model", str(ckpt), *(FAST if fast else [])])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        raise AssertionError("".join(traceback.format_exception(r.exception))) from r.exception
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    return r


def rows_of(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def errors_of(out: Path) -> list[dict]:
    p = out / ".errors.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


PROMPTS = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(["1+2=", "ab ab", "77*3=", "copy abc="])]


# ---- n samples --------------------------------------------------------------------------------------


def test_n_samples_are_distinct_rows_each_reproducible_alone(ckpt, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    gen(ckpt, str(src), "-o", str(out), "--n", "3", "--temperature", "1.0", "--seed", "5")
    rows = rows_of(out)
    assert Counter((r["id"], r["sample_index"]) for r in rows) == {(p["id"], k): 1 for p in PROMPTS for k in range(3)}
    for p in PROMPTS:
        mine = sorted((r for r in rows if r["id"] == p["id"]), key=lambda r: r["sample_index"])
        assert mine[0]["seed"] == 5 and len({r["seed"] for r in mine}) == 3
        assert len({r["completion"] for r in mine}) >= 2  # sampled independently
    # any sample alone: its id, prompt and seed (n = 1) give the same completion, whatever its batch
    alone = [{"id": r["id"], "prompt": r["prompt"], "seed": r["seed"]} for r in rows if r["sample_index"] == 2]
    out2 = tmp_path / "alone"
    gen(ckpt, str(write_jsonl(tmp_path / "alone.jsonl", alone)), "-o", str(out2), "--temperature", "1.0")
    want = {r["id"]: r["completion"] for r in rows if r["sample_index"] == 2}
    assert {r["id"]: r["completion"] for r in rows_of(out2)} == want


def test_more_samples_on_resume_adds_only_the_new_ones(ckpt, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    gen(ckpt, str(src), "-o", str(out), "--n", "2", "--temperature", "0.9")
    first = {(r["id"], r["sample_index"]): r["completion"] for r in rows_of(out)}
    s = json.loads(gen(ckpt, str(src), "-o", str(out), "--n", "4", "--temperature", "0.9").stdout)
    assert s["rows_written"] == 2 * len(PROMPTS) and s["rows_skipped_done"] == 2 * len(PROMPTS)
    rows = rows_of(out)
    assert Counter((r["id"], r["sample_index"]) for r in rows) == {(p["id"], k): 1 for p in PROMPTS for k in range(4)}
    kept = {(r["id"], r["sample_index"]): r["completion"] for r in rows if (r["id"], r["sample_index"]) in first}
    assert kept == first


def test_n_at_temperature_zero_is_refused_with_a_reason(ckpt, tmp_path):
    r = gen(ckpt, str(write_jsonl(tmp_path / "p.jsonl", PROMPTS)), "-o", str(tmp_path / "o1"), "--n", "2", code=2)
    assert r.stderr.strip().count("\n") == 0 and "temperature" in r.stderr
    rows = [{"id": "a", "prompt": "1+1=", "n": 2},  # takes the run's temperature 0: rejected
            {"custom_id": "b", "body": {"prompt": "2+2=", "n": 2}},  # OpenAI line, no temperature: likewise
            {"id": "c", "prompt": "3+3=", "n": 2, "temperature": 0.5}]  # its own temperature: two samples
    out = tmp_path / "o2"
    gen(ckpt, str(write_jsonl(tmp_path / "q.jsonl", rows)), "-o", str(out))
    assert sorted((r["id"], r["sample_index"]) for r in rows_of(out)) == [("c", 0), ("c", 1)]
    reasons = {e["id"]: e["reason"] for e in errors_of(out)}
    assert set(reasons) == {"a", "b"} and all("temperature" in why for why in reasons.values())
    out3 = tmp_path / "o3"  # with a run temperature, the OpenAI line's n is honoured
    gen(ckpt, str(write_jsonl(tmp_path / "q.jsonl", rows[1:2])), "-o", str(out3), "--temperature", "0.7")
    assert sorted(r["sample_index"] for r in rows_of(out3)) == [0, 1]


@pytest.mark.slow
def test_samples_exactly_once_across_a_kill_and_resume(ckpt, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": f"k{i}", "prompt": f"{i}+{i}="} for i in range(40)])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "twotower_cli", "gen", str(src), "-o", str(out), "--model", str(ckpt),
            "--n", "3", "--temperature", "1.0", "--rows-per-shard", "6", "--max-batch-rows", "2",
            "--block", "4", "--max-new-tokens", "24", "-q"]
    p = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 2 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert 0 < len(rows_of(out)) < 120
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    keys = Counter((r["id"], r["sample_index"]) for r in rows_of(out))
    assert keys == {(f"k{i}", k): 1 for i in range(40) for k in range(3)}


# ---- stop strings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["diffusion", "ar", "speculative"])
def test_stop_string_cuts_the_completion_across_tokens_and_blocks(ckpt, tmp_path, mode):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    free = {r["id"]: r for r in rows_of(_run(ckpt, tmp_path / "free", src, "--mode", mode))}
    # a two-character stop across tokens 3 and 4: across the first block boundary (AR may emit the
    # EOS, which is the mask id here: rows that ended early take no stop)
    stops = {i: r["completion"][3:5] for i, r in free.items() if len(r["completion"]) >= 8}
    assert stops
    rows = [{**p, "stop": stops[p["id"]]} if p["id"] in stops else p for p in PROMPTS]
    out = _run(ckpt, tmp_path / "cut", write_jsonl(tmp_path / "s.jsonl", rows), "--mode", mode)
    for r in rows_of(out):
        if r["id"] not in stops:
            assert r["completion"] == free[r["id"]]["completion"]
            continue
        text, stop = free[r["id"]]["completion"], stops[r["id"]]
        i = text.index(stop)
        assert r["completion"] == text[:i] and r["finish_reason"] == "stop"  # the stop string is not kept
        assert r["completion_tokens"] == i + len(stop)  # no token decided after the one completing it
        if mode == "diffusion":
            assert r["denoiser_steps"] < free[r["id"]]["denoiser_steps"]


def _run(ckpt, out, src, *args):
    gen(ckpt, str(src), "-o", str(out), *args)
    return out


def test_run_stop_flag_and_row_stop_override(ckpt, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    free = {r["id"]: r["completion"] for r in rows_of(_run(ckpt, tmp_path / "free", src))}
    stop = free["r0"][6:8]
    rows = [dict(PROMPTS[0]), {**PROMPTS[1], "stop": []}]  # an empty list: this row has no stop strings
    out = _run(ckpt, tmp_path / "cut", write_jsonl(tmp_path / "s.jsonl", rows), "--stop", stop, "--stop", "zzzz")
    got = {r["id"]: r for r in rows_of(out)}
    assert got["r0"]["completion"] == free["r0"][: free["r0"].index(stop)]
    assert got["r1"]["completion"] == free["r1"] and got["r1"]["finish_reason"] == "length"


# ---- sampling filters, pass-through, repetition, formats ------------------------------------------------


def test_top_k_one_is_greedy_and_filters_are_recorded(ckpt, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    greedy = {r["id"]: r["completion"] for r in rows_of(_run(ckpt, tmp_path / "g", src))}
    out = _run(ckpt, tmp_path / "k1", src, "--temperature", "1.5", "--top-k", "1", "--top-p", "0.9")
    rows = rows_of(out)
    assert {r["id"]: r["completion"] for r in rows} == greedy
    assert all(r["top_k"] == 1 and r["top_p"] == 0.9 and r["min_p"] == 0.0 for r in rows)
    gen(ckpt, str(src), "-o", str(tmp_path / "bad"), "--top-p", "0", code=2)


def test_openai_fields_that_cannot_be_honoured_are_rejected_with_a_reason(ckpt, tmp_path):
    rows = [{"custom_id": "ok", "body": {"prompt": "1+1=", "presence_penalty": 0, "top_p": 1, "model": "m"}},
            {"custom_id": "lb", "body": {"prompt": "1+1=", "logit_bias": {"5": 2}}},
            {"custom_id": "lp", "body": {"prompt": "1+1=", "logprobs": True}},
            {"custom_id": "rf", "body": {"prompt": "1+1=", "response_format": {"type": "json_object"}}},
            {"custom_id": "xx", "body": {"prompt": "1+1=", "frobnicate": 1}},
            {"id": "pp", "prompt": "1+1=", "frequency_penalty": 0.5}]
    out = tmp_path / "out"
    s = json.loads(gen(ckpt, str(write_jsonl(tmp_path / "p.jsonl", rows)), "-o", str(out)).stdout)
    assert [r["id"] for r in rows_of(out)] == ["ok"] and s["rows_rejected"] == 5
    reasons = {e["id"]: e["reason"] for e in errors_of(out)}
    for key, field in (("lb", "logit_bias"), ("lp", "logprobs"), ("rf", "response_format"), ("xx", "frobnicate"),
                       ("pp", "frequency_penalty")):
        assert field in reasons[key]


def test_jsonl_extra_fields_become_metadata(ckpt, tmp_path):
    rows = [{"id": "a", "prompt": "1+1=", "source": "wiki", "tags": ["x", 1]}, {"id": "b", "prompt": "2+2="},
            {"custom_id": "c", "url": "/v1/completions", "batch": 7, "body": {"prompt": "3=", "metadata": {"k": "v"}}}]
    out = _run(ckpt, tmp_path / "out", write_jsonl(tmp_path / "p.jsonl", rows))
    meta = {r["id"]: r["metadata"] and json.loads(r["metadata"]) for r in rows_of(out)}
    assert meta == {"a": {"source": "wiki", "tags": ["x", 1]}, "b": None, "c": {"k": "v", "batch": 7}}


def test_parquet_extra_columns_round_trip_with_their_types(ckpt, tmp_path):
    ts = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    t = pa.table({
        "id": pa.array(["a", "b"]), "prompt": pa.array(["1+1=", "2+2="]),
        "score": pa.array([1, None], pa.int32()), "when": pa.array([ts, ts], pa.timestamp("us", tz="UTC")),
        "tags": pa.array([["x"], []], pa.list_(pa.string())), "ok": pa.array([True, False]),
        "completion": pa.array(["ref-a", "ref-b"]),  # an output column's name: kept in `metadata` instead
    })
    src = tmp_path / "p.parquet"
    pq.write_table(t, src)
    out = _run(ckpt, tmp_path / "out", src)
    shard = pq.read_table(sorted(out.glob("part-*.parquet"))[0])
    for name in ("score", "when", "tags", "ok"):
        assert shard.schema.field(name).type == t.schema.field(name).type
    got = {r["id"]: r for r in shard.to_pylist()}
    assert got["a"]["score"] == 1 and got["b"]["score"] is None and got["a"]["when"] == ts
    assert got["a"]["tags"] == ["x"] and got["b"]["ok"] is False
    assert json.loads(got["a"]["metadata"]) == {"completion": "ref-a"}
    # a resume with the same input is a no-op; with other pass-through columns it is refused
    assert json.loads(gen(ckpt, str(src), "-o", str(out)).stdout)["nothing_to_do"]
    pq.write_table(t.drop(["tags"]), src)
    r = gen(ckpt, str(src), "-o", str(out), code=2)
    assert "columns" in r.stderr


def test_repetition_column_flags_a_looping_completion(ckpt, tmp_path):
    out = _run(ckpt, tmp_path / "out", write_jsonl(tmp_path / "p.jsonl", PROMPTS), "--max-new-tokens", "32")
    for r in rows_of(out):
        assert 0.0 <= r["repetition"] <= 1.0
        text = r["completion"]  # the character tokenizer: one token per character
        if len(set(text)) == 1 and len(text) >= 3:
            assert r["repetition"] == 1.0


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_line_formats_for_shards_and_stdout(ckpt, tmp_path, fmt):
    chat = {"custom_id": "b", "body": {"messages": [{"role": "user", "content": "hi"}]}}
    rows = [{"id": "a", "prompt": "1+1="}, chat]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    gen(ckpt, str(src), "-o", str(out), "--format", fmt)
    files = sorted(out.glob("part-*"))
    assert files and all(f.suffix == ".jsonl" for f in files)
    lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    assert len(lines) == 2
    if fmt == "openai":
        by = {x["custom_id"]: x for x in lines}
        assert by["a"]["response"]["body"]["choices"][0]["text"] is not None
        assert by["b"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
        assert by["a"]["response"]["body"]["usage"]["completion_tokens"] == 12
    else:
        assert {x["id"] for x in lines} == {"a", "b"} and all("completion" in x for x in lines)
    assert json.loads(gen(ckpt, str(src), "-o", str(out), "--format", fmt).stdout)["nothing_to_do"]
    gen(ckpt, str(src), "-o", str(out), "--format", "parquet", code=2)  # one format per directory
    r = gen(ckpt, str(src), "-o", "-", "--format", fmt)
    streamed = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{") and '"out_dir"' not in x]
    assert len(streamed) == 2
    gen(ckpt, str(src), "-o", "-", "--format", "parquet", code=2)
