"""`twotower gen` end to end (issue #5): inputs, overrides, engine equality, crash safety, signals,
bad inputs and refusals. In-process runs use typer's CliRunner; crash and signal tests use real
subprocesses (`python -m twotower_cli gen ...`, marked slow). Everything runs on a random tiny checkpoint."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from twotower_cli import load_tokenizer
from twotower_cli.cli import app
from twotower_cli.config import DecodeParams
from twotower_cli.engine import Engine, Request
from twotower_cli.io.rundir import RunLock

ROOT = Path(__file__).resolve().parents[2]
# One torch thread in the children too: tiny shapes, shared CPUs (see conftest.py).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
FAST = ["--block", "4", "--max-new-tokens", "8", "--max-batch-rows", "8", "-q"]
LOUD = FAST[:-1]  # with the progress display on stderr
runner = CliRunner()


# ---- fixtures and helpers -------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else orjson.dumps(r))
            f.write(b"\n")
    return path


def prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"r{i}", "prompt": "".join(rng.choice("0123456789+-*=ab ") for _ in range(rng.randint(2, 24)))}
            for i in range(n)]


def gen(model_dir: Path, *args: str, input: bytes | str | None = None, code: int = 0, fast: bool = True,
        quiet: bool = True):
    """`twotower gen` in process. Checks the exit code and that nothing raised past the CLI."""
    argv = ["gen", *args, "--model", str(model_dir), *((FAST if quiet else LOUD) if fast else [])]
    r = runner.invoke(app, argv, input=input)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        raise AssertionError("".join(traceback.format_exception(r.exception))) from r.exception
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    return r


def summary_of(stdout: str) -> dict:
    """The final stdout is exactly one JSON object: the run summary."""
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    s = json.loads(lines[0])
    assert isinstance(s, dict)
    return s


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def shards(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def read_out(out: Path) -> list[dict]:
    """Every committed row, shard by shard (each shard must be a readable Parquet file)."""
    rows = []
    for p in shards(out):
        rows.extend(pq.read_table(p).to_pylist())
    return rows


def ids_of(out: Path) -> list[str]:
    return [i for p in shards(out) for i in pq.read_table(p, columns=["id"])["id"].to_pylist()]


def errors_of(out: Path) -> list[dict]:
    p = out / ".errors.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines()] if p.exists() else []


def stats_json(out: Path) -> dict:
    r = runner.invoke(app, ["stats", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def check_stats(out: Path, rows: list[dict]) -> dict:
    st = stats_json(out)
    assert st["rows"] == len(rows)
    assert st["modes"] == dict(Counter(r["mode"] for r in rows))
    assert st["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    return st


def spawn(*args: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "twotower_cli", "gen", *args], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)


def wait_running(proc: subprocess.Popen, out: Path, shards_at_least: int = 0, timeout: float = 60) -> bool:
    """Wait until `proc` holds the run directory's lock (model loaded, generating) and has
    committed `shards_at_least` new shards. False if it exited first."""
    deadline = time.monotonic() + timeout
    before = len(shards(out))
    lock = out / ".lock"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            holder = orjson.loads(lock.read_bytes() or b"{}")
        except (OSError, orjson.JSONDecodeError):
            holder = {}
        # The lock is taken before the model loads: wait for the run to be generating.
        if (holder.get("pid") == proc.pid and holder.get("phase") == "generating"
                and len(shards(out)) >= before + shards_at_least):
            return True
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"{proc.args} did not start generating within {timeout}s")


# ---- inputs ---------------------------------------------------------------------------------------


def test_jsonl_file_and_stats(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", prompts(12))
    out = tmp_path / "out"
    r = gen(model_dir, str(src), "-o", str(out), "--rows-per-shard", "5")
    s = summary_of(r.stdout)
    assert s["rows_written"] == 12 and s["rows_rejected"] == 0 and s["complete"] and s["exit_code"] == 0
    rows = read_out(out)
    assert len(shards(out)) == 3 and sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(12))
    want = {p["id"]: p["prompt"] for p in prompts(12)}
    for row in rows:
        assert row["prompt"] == want[row["id"]]
        assert row["mode"] == "diffusion" and row["gamma"] == 0.8 and row["block_size"] == 4
        assert 1 <= row["completion_tokens"] <= 8 and row["finish_reason"] in ("eos", "length")
        assert row["model"].startswith("tiny-random@")
    assert any(row["completion"] for row in rows)
    st = check_stats(out, rows)
    assert st["complete"] is True and st["rejected"] == 0

    # A rerun of the same command has nothing to do.
    s2 = summary_of(gen(model_dir, str(src), "-o", str(out), "--rows-per-shard", "5").stdout)
    assert s2["rows_written"] == 0 and s2["rows_skipped_done"] == 12
    assert sorted(ids_of(out)) == sorted(want)


def test_parquet_with_field_mapping(model_dir, tmp_path):
    ps = prompts(7, seed=1)
    table = pa.table({"key": list(range(100, 107)), "text": [p["prompt"] for p in ps],
                      "extra": ["x"] * 7})
    src = tmp_path / "in.parquet"
    pq.write_table(table, src)
    out = tmp_path / "out"
    s = summary_of(gen(model_dir, str(src), "-o", str(out), "--prompt-field", "text", "--id-field", "key").stdout)
    assert s["rows_written"] == 7
    rows = {r["id"]: r for r in read_out(out)}
    assert sorted(rows) == [str(i) for i in range(100, 107)]  # int ids become strings
    for i, p in zip(range(100, 107), ps):
        assert rows[str(i)]["prompt"] == p["prompt"]
    check_stats(out, list(rows.values()))

    # Without the mapping the file has no prompt column: exit 2, one line.
    r = gen(model_dir, str(src), "-o", str(tmp_path / "out2"), code=2, quiet=False)
    assert "--prompt-field" in one_line_error(r.stderr)


def test_stdin_in_process(model_dir, tmp_path):
    data = b"".join(orjson.dumps(p) + b"\n" for p in prompts(5, seed=2))
    out = tmp_path / "out"
    s = summary_of(gen(model_dir, "-", "-o", str(out), input=data).stdout)
    assert s["rows_written"] == 5 and sorted(ids_of(out)) == [f"r{i}" for i in range(5)]


def test_openai_batch_lines(model_dir, tmp_path):
    lines = [
        {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "12+3"}], "max_tokens": 3}},
        {"custom_id": "req-2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "7*8"}], "temperature": 0.5,
                  "seed": 11}},
        {"custom_id": "req-3", "method": "POST", "url": "/v1/completions", "body": {"prompt": "ab"}},
    ]
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    out = tmp_path / "out"
    s = summary_of(gen(model_dir, str(src), "-o", str(out)).stdout)
    assert s["rows_written"] == 3
    rows = {r["id"]: r for r in read_out(out)}
    assert sorted(rows) == ["req-1", "req-2", "req-3"]
    assert json.loads(rows["req-1"]["prompt"]) == [{"role": "user", "content": "12+3"}]
    assert rows["req-1"]["completion_tokens"] <= 3
    assert rows["req-2"]["temperature"] == 0.5 and rows["req-2"]["seed"] == 11
    assert rows["req-3"]["prompt"] == "ab" and rows["req-3"]["temperature"] == 0.0
    # A chat prompt goes through the chat template: it ends with the separator, then the completion.
    tok = load_tokenizer(model_dir)
    templ = tok.apply_chat_template([{"role": "user", "content": "12+3"}], add_generation_prompt=True,
                                    tokenize=True)
    if isinstance(templ, dict) or hasattr(templ, "keys"):
        templ = templ["input_ids"]
    assert rows["req-1"]["prompt_tokens"] == len(templ)
    check_stats(out, list(rows.values()))


# ---- per-row overrides and equality with the engine ------------------------------------------------


def test_per_row_overrides_reach_the_columns(model_dir, tmp_path):
    rows_in = [
        {"id": "a", "prompt": "1+1="},
        {"id": "b", "prompt": "2+2=", "gamma": 0.3},
        {"id": "c", "prompt": "3+3=", "max_new_tokens": 2},
        {"id": "d", "prompt": "4+4=", "temperature": 0.9, "seed": 5},
        {"id": "e", "prompt": "5+5=", "mode": "ar", "max_new_tokens": 5},
        {"id": "f", "prompt": "6+6=", "mode": "mock-ar", "gamma": 1, "seed": 0},
        {"id": "g", "prompt": "7+7=", "gamma": 0.0, "max_new_tokens": 1},
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows_in)
    out = tmp_path / "out"
    gen(model_dir, str(src), "-o", str(out), "--gamma", "0.6", "--seed", "3")
    rows = {r["id"]: r for r in read_out(out)}
    assert sorted(rows) == list("abcdefg")
    want = {  # id: (mode, gamma, temperature, seed, max_new_tokens)
        "a": ("diffusion", 0.6, 0.0, 3, 8), "b": ("diffusion", 0.3, 0.0, 3, 8), "c": ("diffusion", 0.6, 0.0, 3, 2),
        "d": ("diffusion", 0.6, 0.9, 5, 8), "e": ("ar", 0.6, 0.0, 3, 5), "f": ("mock-ar", 1.0, 0.0, 0, 8),
        "g": ("diffusion", 0.0, 0.0, 3, 1),
    }
    for i, (mode, gamma, temp, seed, cap) in want.items():
        r = rows[i]
        assert (r["mode"], r["gamma"], r["temperature"], r["seed"]) == (mode, gamma, temp, seed), r
        assert 1 <= r["completion_tokens"] <= cap, r
    assert rows["e"]["denoiser_steps"] == 0  # AR never calls the denoiser
    assert rows["g"]["completion_tokens"] == 1
    st = check_stats(out, list(rows.values()))
    assert st["modes"] == {"diffusion": 5, "mock-ar": 1, "ar": 1}


@pytest.mark.parametrize("batch_rows", ["1", "3"])
def test_cli_tokens_equal_the_engine(model_dir, tmp_path, batch_rows):
    """Greedy output through the CLI == `generate_*` on the same prompt ids; sampled output ==
    `Engine` with the same row ids (the noise is keyed by row id and seed). The CLI adds nothing."""
    ps = prompts(6, seed=4)
    modes = ["diffusion", "diffusion", "ar", "mock-ar", "diffusion", "ar"]
    rows_in = [{**p, "mode": m} for p, m in zip(ps, modes)]
    src = write_jsonl(tmp_path / "p.jsonl", rows_in)
    out = tmp_path / "out"
    gen(model_dir, str(src), "-o", str(out), "--block", "4", "--max-new-tokens", "12", "--gamma", "0.5",
        "--steps", "4", "--max-batch-rows", batch_rows, "-q", fast=False)
    rows = {r["id"]: r for r in read_out(out)}

    from twotower_cli import load_model

    model = load_model(model_dir).eval()
    tok = load_tokenizer(model_dir)
    eos = set(model.config.eos_ids)

    def text(tokens: list[int]) -> str:
        return tok.decode(tokens[:-1] if tokens and tokens[-1] in eos else tokens, skip_special_tokens=True)

    for p, m in zip(ps, modes):
        ids = tok.encode(p["prompt"])
        stop = model.config.eos_ids  # the CLI stops at the config's EOS; the API's None never stops
        if m == "diffusion":
            full = model.generate_mask_diffusion([ids], max_new_tokens=12, block_size=4, steps_per_block=4,
                                                 confidence_threshold=0.5, eos_token_id=stop)[0]
        elif m == "ar":
            full = model.generate_ar([ids], max_new_tokens=12, eos_token_id=stop)[0]
        else:
            full = model.generate_mock_ar([ids], max_new_tokens=12, eos_token_id=stop)[0]
        tokens = full[len(ids):]
        r = rows[p["id"]]
        assert r["prompt_tokens"] == len(ids)
        assert r["completion_tokens"] == len(tokens), (p["id"], r, tokens)
        assert r["completion"] == text(tokens), (p["id"], r["completion"], tokens)

    # Sampling: the same row ids and settings through the bare engine.
    out2 = tmp_path / "out2"
    gen(model_dir, str(src), "-o", str(out2), "--block", "4", "--max-new-tokens", "12", "--temperature", "0.8",
        "--seed", "9", "--max-batch-rows", batch_rows, "-q", fast=False)
    sampled = {r["id"]: r for r in read_out(out2)}
    base = DecodeParams(block_size=4, max_new_tokens=12, temperature=0.8, seed=9)
    reqs = [Request(p["id"], tok.encode(p["prompt"]), base.replace(mode=m)) for p, m in zip(ps, modes)]
    for res in Engine(model, max_batch_rows=int(batch_rows)).run(reqs):
        assert sampled[res.id]["completion"] == text(res.tokens)
        assert sampled[res.id]["completion_tokens"] == len(res.tokens)


# ---- crash safety ----------------------------------------------------------------------------------


@pytest.mark.slow  # real subprocesses
def test_sigkill_at_random_moments_then_resume(model_dir, tmp_path):
    n = 200
    good = prompts(n, seed=5)
    bad = [b'{"id": "bad-json", "prompt": ', orjson.dumps({"id": "bad-gamma", "prompt": "x", "gamma": 3})]
    src = write_jsonl(tmp_path / "p.jsonl", good[:50] + bad[:1] + good[50:100] + bad[1:] + good[100:])
    out = tmp_path / "out"
    args = [str(src), "-o", str(out), "--rows-per-shard", "5", "--max-batch-rows", "4", "--max-new-tokens", "8",
            "--block", "4", "-q"]
    rng = random.Random(20240605)
    killed_mid_run, seen = 0, 0
    for _ in range(3):
        proc = spawn(*args, "--model", str(model_dir))
        running = wait_running(proc, out)
        time.sleep(rng.uniform(0.0, 0.6))  # the whole run takes ~3 s of generating
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        killed_mid_run += running and proc.returncode == -signal.SIGKILL
        # After any kill: committed shards are readable and hold no id twice.
        ids = ids_of(out)
        assert len(ids) == len(set(ids)) and len(ids) >= seen
        seen = len(ids)
    assert killed_mid_run >= 2, "the kills should land while the run is generating"
    assert seen < n, "the run should not have finished before the last kill"

    # The final resume as a shell would run it: a real process reading the prompts from stdin.
    p = subprocess.run([sys.executable, "-m", "twotower_cli", "gen", "-", *args[1:], "--model", str(model_dir)],
                       input=src.read_bytes(), capture_output=True, env=ENV, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr.decode()
    s = summary_of(p.stdout.decode())  # stdout is the summary alone
    assert s["complete"] and s["rows_skipped_done"] == seen and s["rows_written"] == n - seen
    ids = ids_of(out)
    assert sorted(ids) == sorted(p["id"] for p in good)  # every good id exactly once
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for p in shards(out):
        pq.read_table(p)
    errs = errors_of(out)
    assert sorted((e["line_no"], e["id"]) for e in errs) == [(51, None), (102, "bad-gamma")]  # once each
    m = orjson.loads((out / ".manifest.json").read_bytes())
    assert m["complete"] is True and m["rows"] == n and m["rejected"] == 2
    assert stats_json(out)["rows"] == n


@pytest.mark.slow  # real subprocesses
def test_sigterm_commits_and_exits_3_then_resume(model_dir, tmp_path):
    n = 60
    good = prompts(n, seed=6)
    src = write_jsonl(tmp_path / "p.jsonl", good)
    out = tmp_path / "out"
    args = [str(src), "-o", str(out), "--rows-per-shard", "5", "--max-batch-rows", "4", "--max-new-tokens", "8",
            "--block", "4"]
    proc = spawn(*args, "--model", str(model_dir))  # with the progress display (stderr)
    assert wait_running(proc, out, shards_at_least=1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr.decode()
    assert "Traceback" not in stderr.decode()
    s = summary_of(stdout.decode())
    assert s["interrupted"] is True and s["complete"] is False and s["exit_code"] == 3
    rows = read_out(out)  # committed rows are readable
    assert 5 <= len(rows) < n and s["rows_written"] == len(rows)  # every finished row was committed
    assert len({r["id"] for r in rows}) == len(rows)
    assert orjson.loads((out / ".manifest.json").read_bytes())["complete"] is False

    s2 = summary_of(gen(model_dir, *args, "-q", fast=False).stdout)
    assert s2["complete"] and s2["rows_skipped_done"] == len(rows) and s2["rows_written"] == n - len(rows)
    assert sorted(ids_of(out)) == sorted(p["id"] for p in good)


@pytest.mark.slow  # real subprocesses
def test_second_signal_stops_at_once(no_eos_model_dir, tmp_path):
    """Rows in flight are long (2000 tokens each, no EOS): the first SIGTERM lets them finish, the
    second must stop without waiting for them."""
    src = write_jsonl(tmp_path / "p.jsonl", prompts(40, seed=7))
    out = tmp_path / "out"
    proc = spawn(str(src), "-o", str(out), "--model", str(no_eos_model_dir), "--block", "4",
                 "--max-new-tokens", "2000", "--max-batch-rows", "8", "-q")
    assert wait_running(proc, out)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 3, stderr.decode()
    assert took < 5.0, f"the second signal took {took:.1f}s to stop the run"
    s = summary_of(stdout.decode())
    assert s["interrupted"] is True and s["exit_code"] == 3
    assert len(read_out(out)) == s["rows_written"]


# ---- bad rows ---------------------------------------------------------------------------------------


def test_bad_input_corpus(model_dir, tmp_path):
    lines = [
        orjson.dumps({"id": "ok1", "prompt": "1+2="}),  # 1
        b'{"id": "broken", "prompt": "1+',  # 2 malformed JSON
        orjson.dumps({"id": "noprompt"}),  # 3 missing prompt
        orjson.dumps({"id": "empty", "prompt": "   "}),  # 4 empty prompt
        orjson.dumps({"id": "num", "prompt": 42}),  # 5 non-string prompt
        orjson.dumps({"id": "mnt", "prompt": "x", "max_new_tokens": "8"}),  # 6 wrong override type
        orjson.dumps({"id": "temp", "prompt": "x", "temperature": "hot"}),  # 7 wrong override type
        orjson.dumps({"id": "gam", "prompt": "x", "gamma": 1.5}),  # 8 gamma out of range
        b'{"id": "utf", "prompt": "caf\xc3"}',  # 9 invalid UTF-8
        orjson.dumps({"id": "ok1", "prompt": "again"}),  # 10 duplicate id
        orjson.dumps({"id": "long", "prompt": "7" * 5000}),  # 11 longer than the model allows
        b"",  # 12 blank: skipped silently
        orjson.dumps({"id": "ok2", "prompt": "9*9="}),  # 13
        b"[1, 2]",  # 14 not an object
        orjson.dumps({"id": "mode", "prompt": "x", "mode": "bogus"}),  # 15 unknown mode
        orjson.dumps({"prompt": "no id is fine"}),  # 16 derived id
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "out"
    r = gen(model_dir, str(src), "-o", str(out))
    s = summary_of(r.stdout)
    assert s["rows_rejected"] == 12 and s["rows_written"] == 3 and s["exit_code"] == 0
    rows = read_out(out)
    ids = {r["id"] for r in rows}
    assert len(rows) == 3 and {"ok1", "ok2"} <= ids and any(i.startswith("h-") for i in ids)
    assert next(r for r in rows if r["id"] == "ok1")["prompt"] == "1+2="  # the first of a duplicate wins
    errs = {e["line_no"]: e for e in errors_of(out)}
    expect = {2: "malformed JSON", 3: "missing 'prompt'", 4: "'prompt' is empty", 5: "'prompt' must be a string",
              6: "max_new_tokens", 7: "temperature", 8: "gamma", 9: "invalid UTF-8", 10: "duplicate id",
              11: "prompt too long", 14: "not a JSON object", 15: "mode"}
    assert sorted(errs) == sorted(expect)
    for line_no, words in expect.items():
        assert words in errs[line_no]["reason"], errs[line_no]
    assert errs[10]["id"] == "ok1" and errs[11]["id"] == "long"
    assert stats_json(out)["rejected"] == 12

    # --fail-on-error: same result, exit 4 (also on a rerun that finds the rows already logged).
    r = gen(model_dir, str(src), "-o", str(tmp_path / "out2"), "--fail-on-error", code=4)
    assert summary_of(r.stdout)["exit_code"] == 4 and len(read_out(tmp_path / "out2")) == 3
    r = gen(model_dir, str(src), "-o", str(tmp_path / "out2"), "--fail-on-error", code=4)
    s = summary_of(r.stdout)
    assert s["rows_rejected"] == 12 and s["rows_written"] == 0 and s["rows_skipped_done"] == 3
    assert len(errors_of(tmp_path / "out2")) == 12  # not logged twice
    # Without the flag the rerun is a clean no-op.
    assert summary_of(gen(model_dir, str(src), "-o", str(out)).stdout)["exit_code"] == 0


# ---- refusals: fingerprint, lock, flags --------------------------------------------------------------


def test_fingerprint_refusal_and_overwrite(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", prompts(4, seed=8))
    out = tmp_path / "out"
    gen(model_dir, str(src), "-o", str(out), "--gamma", "0.8")
    r = gen(model_dir, str(src), "-o", str(out), "--gamma", "0.5", code=2, quiet=False)
    line = one_line_error(r.stderr)
    assert "gamma" in line and "--overwrite" in line
    assert r.stdout == ""
    assert {r["gamma"] for r in read_out(out)} == {0.8}  # untouched
    s = summary_of(gen(model_dir, str(src), "-o", str(out), "--gamma", "0.5", "--overwrite").stdout)
    assert s["rows_written"] == 4
    rows = read_out(out)
    assert len(rows) == 4 and {r["gamma"] for r in rows} == {0.5}


def _hold_lock(out: str, ready, release) -> None:
    lock = RunLock(Path(out))
    lock.acquire()
    ready.set()
    release.wait(60)
    lock.release()


def test_locked_directory_is_refused(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", prompts(3, seed=9))
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_lock, args=(str(out), ready, release))
    child.start()
    try:
        assert ready.wait(30)
        r = gen(model_dir, str(src), "-o", str(out), code=2, quiet=False)
        line = one_line_error(r.stderr)
        assert "locked" in line and f"pid {child.pid}" in line
        assert not shards(out)
    finally:
        release.set()
        child.join(30)
    assert summary_of(gen(model_dir, str(src), "-o", str(out)).stdout)["rows_written"] == 3  # free again


@pytest.mark.parametrize("case", ["missing-input", "mode", "gamma", "block", "model-dir", "steps", "temperature"])
def test_bad_flags_exit_2_one_line(model_dir, tmp_path, case):
    src = write_jsonl(tmp_path / "p.jsonl", prompts(2))
    out = str(tmp_path / "out")
    args = {
        "missing-input": [str(tmp_path / "nope.jsonl"), "-o", out],
        "mode": [str(src), "-o", out, "--mode", "bogus"],
        "gamma": [str(src), "-o", out, "--gamma", "2"],
        "block": [str(src), "-o", out, "--block", "0"],
        "steps": [str(src), "-o", out, "--steps", "-1"],
        "temperature": [str(src), "-o", out, "--temperature", "-0.5"],
        "model-dir": [str(src), "-o", out],
    }[case]
    model = tmp_path / "no-such-model" if case == "model-dir" else model_dir
    r = runner.invoke(app, ["gen", *args, "--model", str(model)])  # with the progress display
    assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
    line = one_line_error(r.stderr)
    word = {"missing-input": "nope.jsonl", "mode": "mode", "gamma": "gamma", "block": "block_size",
            "steps": "steps_per_block", "temperature": "temperature", "model-dir": "no-such-model"}[case]
    assert word in line
    assert r.stdout == ""
    assert not Path(out).exists() or not shards(Path(out))


@pytest.mark.slow  # real subprocesses
def test_bad_flag_in_a_real_process(tmp_path):
    """The same as seen from a shell: stderr is one line, no traceback, exit 2."""
    src = write_jsonl(tmp_path / "p.jsonl", prompts(2))
    p = subprocess.run([sys.executable, "-m", "twotower_cli", "gen", str(src), "-o", str(tmp_path / "out"),
                        "--model", str(tmp_path / "no-such-model")], capture_output=True, env=ENV, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 2
    assert "no-such-model" in one_line_error(p.stderr.decode())
    assert p.stdout == b""


def test_speculative_mode_writes_ar_completions_and_scores(model_dir, tmp_path):
    """`--mode speculative` (and per-row "mode": "speculative") writes AR's completions, with
    accepted_per_round and the AR score; `--ar-score` scores diffusion rows too, which are null
    by default."""
    ps = prompts(6, seed=9)
    rows_in = [dict(p, mode="diffusion") if i % 3 == 0 else p for i, p in enumerate(ps)]
    src = write_jsonl(tmp_path / "p.jsonl", rows_in)
    common = ["--block-size", "4", "--steps-per-block", "4", "--max-new-tokens", "10"]
    gen(model_dir, str(src), "-o", str(tmp_path / "spec"), "--mode", "speculative", *common)
    gen(model_dir, str(src), "-o", str(tmp_path / "ar"), "--mode", "ar", *common)
    gen(model_dir, str(src), "-o", str(tmp_path / "scored"), "--mode", "speculative", "--ar-score", *common)
    spec = {r["id"]: r for r in read_out(tmp_path / "spec")}
    ar = {r["id"]: r for r in read_out(tmp_path / "ar")}
    scored = {r["id"]: r for r in read_out(tmp_path / "scored")}
    for i, p in enumerate(rows_in):
        s = spec[p["id"]]
        if i % 3 == 0:  # a per-row diffusion override
            assert s["mode"] == "diffusion" and s["accepted_per_round"] is None and s["ar_logprob"] is None
            assert scored[p["id"]]["ar_logprob"] is not None and 0 <= scored[p["id"]]["ar_agreement"] <= 1
            continue
        assert s["mode"] == "speculative" and s["completion"] == ar[p["id"]]["completion"]
        assert s["accepted_per_round"] >= 1 and s["ar_logprob"] == pytest.approx(ar[p["id"]]["ar_logprob"], abs=1e-4)
        assert s["ar_agreement"] == ar[p["id"]]["ar_agreement"] == 1.0  # greedy: every token is AR's argmax
