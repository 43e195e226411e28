"""An adversarial pass over `twotower gen` (issue: hardening, parts A and B): bad inputs, flag values,
files, directories, checkpoints and environment, each giving a documented exit code, one line on
stderr (never a traceback), and every good row written exactly once. In-process cases use typer's
CliRunner; signal cases are real processes (slow; the phase-by-phase ones are in test_signals.py).
A case that exposes an open bug in a file of another layer is a strict xfail naming the fix."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from twotower_cli.cli import app
from twotower_cli.config import DecodeParams

ROOT = Path(__file__).resolve().parents[2]
ENV_FIXED = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # over os.environ, read when a test runs
FAST = ["--block", "4", "--max-new-tokens", "6", "--max-batch-rows", "8", "-q"]
runner = CliRunner()
GOOD = [{"id": f"g{i}", "prompt": f"{i}+{i}="} for i in range(4)]


@pytest.fixture(autouse=True)
def _private_digest_cache(tmp_path, monkeypatch):
    """The checkpoint fingerprint caches weight digests per user: never in the real home of whoever
    runs the tests (subprocesses inherit it through os.environ)."""
    monkeypatch.setenv("TWOTOWER_CACHE_DIR", str(tmp_path / "digest-cache"))


def invoke(model_dir: Path, *args: str, input: bytes | None = None):
    r = runner.invoke(app, ["gen", *FAST, "--model", str(model_dir), *args], input=input)  # the last flag wins
    if r.exception is not None and not isinstance(r.exception, SystemExit):  # a traceback: a bug
        import traceback

        raise AssertionError("".join(traceback.format_exception(r.exception))) from r.exception
    return r


def one_line_error(stderr: str, *words: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def jsonl(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows))
    return path


def out_ids(out: Path) -> list[str]:
    return [i for p in sorted(out.glob("part-*.parquet")) for i in pq.read_table(p, columns=["id"])["id"].to_pylist()]


def errors_of(out: Path) -> dict[int, dict]:
    p = out / ".errors.jsonl"
    return {e["line_no"]: e for e in map(json.loads, p.read_text().splitlines())} if p.exists() else {}


def summary(stdout: str) -> dict:
    (line,) = stdout.strip().splitlines()
    return json.loads(line)


# ---- DecodeParams: the one place ranges live ------------------------------------------------------

BAD_PARAMS = [
    ({"temperature": 1e39}, "temperature must be at most 100"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": -1e-9}, "temperature must be >= 0"),
    ({"gamma": float("nan")}, "gamma must be a finite number"),
    ({"gamma": -0.0001}, "gamma must be in [0, 1]"),
    ({"seed": 2**63}, "seed must fit in 64 bits"),
    ({"seed": 10**5000}, "an integer of"),  # repr of a 5000-digit int would raise
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"seed": 1.5}, "seed must be a non-negative integer"),
    ({"max_new_tokens": 2**40}, "max_new_tokens must be at most"),
    ({"block_size": 10**6}, "block_size must be at most"),
    ({"steps_per_block": 10**6}, "steps_per_block must be at most"),
    ({"mask_token_id": 2**40}, "mask_token_id must be at most"),
    ({"mode": ["diffusion"]}, "mode must be one of"),
    ({"mode": None}, "mode must be one of"),
]


@pytest.mark.parametrize(("kw", "words"), BAD_PARAMS,
                         ids=[f"{i}-{next(iter(k))}" for i, (k, _) in enumerate(BAD_PARAMS)])
def test_decode_params_bounds(kw, words):
    from twotower_cli.config import ConfigError

    with pytest.raises(ConfigError, match=None) as e:
        DecodeParams(**kw)
    assert words in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 200


def test_bounds_are_inclusive_where_documented():
    DecodeParams(temperature=100.0, seed=2**63 - 1, gamma=1.0, max_new_tokens=1 << 20, block_size=1024,
                 steps_per_block=1024)


# ---- flags ------------------------------------------------------------------------------------------

FLAG_CASES = {
    "temperature-1e39": (["--temperature", "1e39"], "temperature"),
    "temperature-inf": (["--temperature", "inf"], "temperature"),
    "temperature-nan": (["--temperature", "nan"], "temperature"),
    "gamma-nan": (["--gamma", "nan"], "gamma"),
    "seed-2^63": (["--seed", str(2**63)], "seed"),
    "seed-huge": (["--seed", "9" * 400], "seed"),
    "max-new-tokens-huge": (["--max-new-tokens", str(10**12)], "max_new_tokens"),
    "block-huge": (["--block", str(10**7)], "block_size"),
    "steps-huge": (["--steps", str(10**7)], "steps_per_block"),
    "mask-id-huge": (["--mask-token-id", str(2**62)], "mask_token_id"),
    "mask-id-outside-vocab": (["--mask-token-id", "100000"], "outside the vocabulary"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flag_values_exit_2_one_line_nothing_written(model_dir, tmp_path, case):
    flags, word = FLAG_CASES[case]
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out), *flags)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    one_line_error(r.stderr, word)
    assert not out_ids(out) if out.exists() else True


def test_max_new_tokens_beyond_the_context_rejects_rows_with_a_positive_limit(model_dir, tmp_path):
    """The tiny model's context is 4096: max_new_tokens alone exceeds it. The reason never prints a
    negative limit."""
    src = jsonl(tmp_path / "p.jsonl", [*GOOD[:2], {"id": "big", "prompt": "1+1=", "max_new_tokens": 5000}])
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert sorted(out_ids(out)) == ["g0", "g1"]
    (e,) = errors_of(out).values()
    assert e["id"] == "big" and "leaves no room" in e["reason"] and "-" not in e["reason"].split("context")[1]


# ---- per-row values: the row is rejected with a reason, every good row is written once ------------

BAD_ROWS = [
    (b'{"id": "t39", "prompt": "1+1=", "temperature": 1e39}', "temperature must be at most"),
    (b'{"id": "tinf", "prompt": "1+1=", "temperature": Infinity}', "malformed JSON"),  # not JSON
    (b'{"id": "tnan", "prompt": "1+1=", "temperature": NaN}', "malformed JSON"),
    (b'{"id": "sbig", "prompt": "1+1=", "seed": 9223372036854775808}', "seed must fit in 64 bits"),
    (b'{"id": "sneg", "prompt": "1+1=", "seed": -5}', "seed must be a non-negative integer"),
    (b'{"id": "sflt", "prompt": "1+1=", "seed": 1e300}', "seed must be a non-negative integer"),
    (b'{"id": "mnt", "prompt": "1+1=", "max_new_tokens": 99999999999}', "max_new_tokens must be at most"),
    (b'{"id": "mntl", "prompt": "1+1=", "max_new_tokens": [8]}', "max_new_tokens must be a positive integer"),
    (b'{"id": "gobj", "prompt": "1+1=", "gamma": {"a": 1}}', "gamma must be a finite number"),
    (b'{"id": "mode", "prompt": "1+1=", "mode": {"x": []}}', "mode must be one of"),
    (b'{"id": "ws", "prompt": " \\t\\n\\u3000 "}', "'prompt' is empty"),
    (b'{"id": "nested", "prompt": [[[[[["x"]]]]]]}', "'prompt' must be a string"),
    (b'{"id": "deep", "prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}", "malformed JSON"),
    (b'{"id": {"x": 1}, "prompt": "1+1="}', "'id' must be a string or an integer"),
    (b'{"id": "   ", "prompt": "1+1="}', "'id' is empty"),
    (b'{"id": "msg-bad", "messages": [{"role": "user", "content": ["x"]}]}', "messages[0]"),
    (b'{"id": "msg-ws", "messages": [{"role": "user", "content": "   "}]}', "'messages' has no content"),
    (b'{"id": "utf", "prompt": "\xed\xa0\x80"}', "invalid UTF-8"),  # a UTF-8-encoded surrogate
    (b'{"id": "lone", "prompt": "\\ud800"}', "malformed JSON"),  # a lone surrogate escape: orjson refuses
    (b'\x00\x00\x00', "malformed JSON"),
    (b'"just a string"', "not a JSON object"),
    (b'{"id": "oai", "custom_id": "c1", "body": {"messages": [{"role": "user", "content": "1+1="}], '
     b'"temperature": 1e39}}', "temperature must be at most"),
]


def test_bad_rows_each_rejected_with_a_reason_good_rows_once(model_dir, tmp_path):
    lines, expect = [], {}
    for i, (bad, words) in enumerate(BAD_ROWS):
        lines.append(orjson.dumps({"id": f"ok{i}", "prompt": f"{i}*2="}))
        lines.append(bad)
        expect[len(lines)] = words
    src = jsonl(tmp_path / "p.jsonl", lines)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    s = summary(r.stdout)
    assert s["rows_written"] == len(BAD_ROWS) and s["rows_rejected"] == len(BAD_ROWS)
    ids = out_ids(out)
    assert sorted(ids) == sorted(f"ok{i}" for i in range(len(BAD_ROWS)))  # every good row, once
    errs = errors_of(out)
    assert sorted(errs) == sorted(expect)
    for line_no, words in expect.items():
        assert words in errs[line_no]["reason"], (line_no, errs[line_no])
    # A rerun is a no-op: nothing written twice.
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0 and summary(r.stdout)["rows_written"] == 0 and len(out_ids(out)) == len(BAD_ROWS)


# ---- broken files: keep what was read, one line, exit 2 -------------------------------------------


def test_truncated_gzip_keeps_rows_before_it(model_dir, tmp_path):
    rows = [{"id": f"z{i}", "prompt": f"{i}-1="} for i in range(400)]
    data = gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    src = tmp_path / "p.jsonl.gz"
    src.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 2, r.stderr
    line = one_line_error(r.stderr, "p.jsonl.gz", "read before it were kept")
    kept = int(re.search(r"the (\d+) row", line).group(1))
    ids = out_ids(out)
    assert 0 < kept < 400 and sorted(ids) == sorted(f"z{i}" for i in range(kept))  # each once
    assert orjson.loads((out / ".manifest.json").read_bytes())["complete"] is False
    # The rerun still reports it (exit 2) and writes nothing twice.
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 2 and sorted(out_ids(out)) == sorted(ids)


def _parquet(path: Path, n: int, row_group_size: int = 300) -> Path:
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(n)], "prompt": [f"{i}*3=" for i in range(n)]}), path,
                   row_group_size=row_group_size, compression="snappy")
    return path


def test_corrupt_parquet_page_keeps_rows_before_it(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("twotower_cli.io.reader.PARQUET_BATCH_ROWS", 100)
    good = _parquet(tmp_path / "good.parquet", 900)
    b = bytearray(good.read_bytes())
    meta = pq.ParquetFile(good).metadata
    rg = meta.row_group(2).column(1)  # the prompt column of the third row group
    start = rg.data_page_offset + 20
    for i in range(start, start + 64):
        b[i] ^= 0xA5
    src = tmp_path / "bad.parquet"
    src.write_bytes(bytes(b))
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 2, r.stderr
    one_line_error(r.stderr, "bad.parquet", "read before it were kept")
    ids = out_ids(out)
    assert len(ids) == len(set(ids)) >= 600 and set(ids) <= {f"q{i}" for i in range(900)}


def test_truncated_parquet_is_one_line(model_dir, tmp_path):
    good = _parquet(tmp_path / "good.parquet", 50)
    src = tmp_path / "cut.parquet"
    src.write_bytes(good.read_bytes()[:-30])
    r = invoke(model_dir, str(src), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    one_line_error(r.stderr, "cut.parquet", "not a readable Parquet")


def test_empty_parquet_named_file_is_one_line(model_dir, tmp_path):
    src = tmp_path / "empty.parquet"
    src.write_bytes(b"")
    r = invoke(model_dir, str(src), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    one_line_error(r.stderr, "empty.parquet")


def _invalid_utf8_parquet(path: Path) -> Path:
    prompts = [b"1+1=", b"caf\xc3", b"2+2=", b"\xff\xfe", b"3+3="]
    binary = pa.array(prompts, pa.binary())
    as_string = pa.Array.from_buffers(pa.string(), len(prompts), binary.buffers())  # not validated
    pq.write_table(pa.table({"id": [f"u{i}" for i in range(5)], "prompt": as_string}), path)
    return path


def test_parquet_invalid_utf8_rejects_the_row_not_its_batch(model_dir, tmp_path):
    src = _invalid_utf8_parquet(tmp_path / "u.parquet")
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert sorted(out_ids(out)) == ["u0", "u2", "u4"]
    errs = errors_of(out)
    assert sorted(errs) == [2, 4] and all("invalid UTF-8" in e["reason"] for e in errs.values())


def test_parquet_id_column_of_wrong_type(model_dir, tmp_path):
    src = tmp_path / "f.parquet"
    pq.write_table(pa.table({"id": [1.5, 2.5], "prompt": ["1+1=", "2+2="]}), src)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0 and out_ids(out) == []
    assert all("'id' must be a string or an integer" in e["reason"] for e in errors_of(out).values())


def test_parquet_prompt_column_of_structs(model_dir, tmp_path):
    src = tmp_path / "s.parquet"
    pq.write_table(pa.table({"prompt": [{"a": 1}, {"a": 2}]}), src)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0 and out_ids(out) == [] and len(errors_of(out)) == 2


def test_directory_as_input(model_dir, tmp_path):
    r = invoke(model_dir, str(tmp_path), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    one_line_error(r.stderr, "Is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_input_file(model_dir, tmp_path):
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    src.chmod(0)
    try:
        r = invoke(model_dir, str(src), "-o", str(tmp_path / "out"))
    finally:
        src.chmod(0o644)
    assert r.exit_code == 2
    one_line_error(r.stderr, "p.jsonl", "Permission denied")


def test_empty_and_blank_only_input_is_complete_and_writes_nothing(model_dir, tmp_path):
    for name, data in (("empty.jsonl", b""), ("blank.jsonl", b"\n\n   \n\t\n")):
        src = tmp_path / name
        src.write_bytes(data)
        out = tmp_path / f"out-{name}"
        r = invoke(model_dir, str(src), "-o", str(out))
        assert r.exit_code == 0, r.stderr
        assert out_ids(out) == []


def test_non_utf8_names(model_dir, tmp_path):
    bad = os.fsdecode(b"d\xff")
    (tmp_path / bad).mkdir()
    src = jsonl(tmp_path / bad / "p.jsonl", GOOD)  # an input under a non-UTF-8 name reads fine
    r = invoke(model_dir, str(src), "-o", str(tmp_path / "ok"))
    assert r.exit_code == 0, r.stderr
    assert sorted(out_ids(tmp_path / "ok")) == [g["id"] for g in GOOD]
    r = invoke(model_dir, str(src), "-o", str(tmp_path / bad / "out"))  # an output directory does not
    assert r.exit_code == 2
    one_line_error(r.stderr, "not valid UTF-8", "d\\udcff")


def test_output_path_is_a_file(model_dir, tmp_path):
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    f = tmp_path / "file"
    f.write_text("x")
    r = invoke(model_dir, str(src), "-o", str(f / "sub"))
    assert r.exit_code == 2
    one_line_error(r.stderr)


# ---- hostile chat templates --------------------------------------------------------------------------


def _with_template(model_dir: Path, tmp_path: Path, template: str) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(model_dir, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (d / extra).unlink(missing_ok=True)
    return d


def test_hostile_template_rejects_message_rows_prompts_still_run(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("twotower_cli.batcher.TEMPLATE_SECONDS", 0.5)
    monkeypatch.setattr("twotower_cli.batcher.BatchPolicy.template_seconds", 0.5)
    ckpt = _with_template(model_dir, tmp_path, "{% for i in range(100000) %}{% for j in range(100000) %}"
                                               "{{ i }}{% endfor %}{% endfor %}")
    msgs = [{"id": f"m{i}", "messages": [{"role": "user", "content": "1+1="}]} for i in range(3)]
    src = jsonl(tmp_path / "p.jsonl", [*GOOD, *msgs])
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = invoke(ckpt, str(src), "-o", str(out))
    assert time.monotonic() - t0 < 30
    assert r.exit_code == 0, r.stderr
    assert sorted(out_ids(out)) == [g["id"] for g in GOOD]
    errs = errors_of(out)
    assert len(errs) == 3 and all("chat template: rendering took longer" in e["reason"] for e in errs.values())


def test_hostile_template_for_every_row_fails_the_run_in_one_line(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("twotower_cli.batcher.BatchPolicy.template_seconds", 0.5)
    ckpt = _with_template(model_dir, tmp_path, "{% for i in range(100000) %}{% for j in range(100000) %}"
                                               "{{ i }}{% endfor %}{% endfor %}")
    src = jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": f"{i}+1="}]} for i in range(5)])
    r = invoke(ckpt, str(src), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    one_line_error(r.stderr, "chat template", "longer than")


def test_template_rendering_empty_prompt_and_raising(model_dir, tmp_path):
    ckpt = _with_template(model_dir, tmp_path,
                          "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}"
                          "{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{% endfor %}")
    rows = [{"id": "sys-only", "messages": [{"role": "system", "content": "be brief"}]},
            {"id": "tool", "messages": [{"role": "tool", "content": "x"}]},
            {"id": "user", "messages": [{"role": "user", "content": "1+1="}]}, *GOOD]
    src = jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    r = invoke(ckpt, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert sorted(out_ids(out)) == sorted(["user", *(g["id"] for g in GOOD)])
    errs = {e["id"]: e["reason"] for e in errors_of(out).values()}
    assert "empty prompt" in errs["sys-only"] and "no tools" in errs["tool"]


# ---- the CLI boundary -------------------------------------------------------------------------------


def test_os_error_at_the_boundary_is_one_line_and_bugs_keep_their_traceback(model_dir, tmp_path, monkeypatch):
    import twotower_cli.commands.gen as gen_cmd

    src = jsonl(tmp_path / "p.jsonl", GOOD)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "part-00000.parquet"))

    monkeypatch.setattr(gen_cmd, "plan", disk_full)
    r = invoke(model_dir, str(src), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    one_line_error(r.stderr, "part-00000.parquet: No space left on device")

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(gen_cmd, "plan", bug)
    r = runner.invoke(app, ["gen", str(src), "-o", str(tmp_path / "out"), "--model", str(model_dir)])
    assert isinstance(r.exception, ZeroDivisionError)  # not swallowed: a traceback, exit 1


# ---- signals at start-up (real processes) ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_at_start_up_exits_3_one_line(model_dir, tmp_path, sig):
    """stdin stays open and empty: the run blocks at start-up (before torch and the model), where
    the signal must give exit 3 and "rerun to resume", no traceback, nothing written."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "twotower_cli", "gen", "-", "-o", str(out), "--model",
                             str(model_dir), "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **ENV_FIXED}, cwd=ROOT)
    time.sleep(3.0)  # imports done, blocked reading stdin
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    err = stderr.decode()
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "rerun the same command to resume" in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    assert not out_ids(out) if out.exists() else True


@pytest.mark.slow
@pytest.mark.parametrize("delays", [(0.15, 0.3, 0.6)], ids=["start-up"])
# (A SIGTERM while the model loads once ended the process by SIGINT after the "interrupted" line:
# a KeyboardInterrupt caught inside exec()'d code; fixed in cli.main, see test_signals.py.)
def test_signal_at_the_first_moments_exits_3(model_dir, tmp_path, delays):
    """Signals at several moments of start-up, before and after `main`: never 143, never a traceback."""
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    for i, delay in enumerate(delays):
        proc = subprocess.Popen([sys.executable, "-m", "twotower_cli", "gen", str(src), "-o", str(tmp_path / f"o{i}"),
                                 "--model", str(model_dir), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, **ENV_FIXED}, cwd=ROOT)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # finished before the signal
        assert proc.returncode == 3, (delay, stderr.decode())
        assert "Traceback" not in stderr.decode()


# ---- flags that do not parse: one line, exit 2, nothing touched (part B) ------------------------------

USAGE_CASES = {
    "unknown-option": (["--nope"], "no such option: --nope"),
    "missing-out": (["__NO_OUT__"], "missing option '--out'"),
    "out-without-value": (["-o"], "requires an argument"),
    "temperature-not-a-number": (["--temperature", "abc"], "'--temperature'"),
    "limit-junk": (["--limit", "12x"], "'--limit'"),
    "limit-negative": (["--limit", "-1"], "'--limit'"),
    "max-new-tokens-fraction": (["--max-new-tokens", "1.5"], "'--max-new-tokens'"),
    "gamma-fullwidth-digits": (["--gamma", "\uff10.\uff15"], "'--gamma'"),
    "max-batch-rows-zero": (["--max-batch-rows", "0"], "'--max-batch-rows'"),
    "extra-argument": (["extra"], "unexpected extra argument"),
    "model-with-nul": (["--model", "m\x00"], "null byte"),
}


@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_flag_parse_errors_are_one_line_exit_2(tmp_path, monkeypatch, case):
    flags, words = USAGE_CASES[case]
    monkeypatch.chdir(tmp_path)
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    if flags == ["__NO_OUT__"]:
        args = ["gen", str(src)]
    elif flags == ["-o"]:
        args = ["gen", str(src), "-o"]
    else:
        args = ["gen", str(src), "-o", str(tmp_path / "out"), *flags]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    line = one_line_error(r.stderr, words)
    assert line.endswith("; see 'twotower gen --help'") or line.endswith("; see 'twotower --help'"), line
    assert "╭" not in r.stderr and "Usage:" not in r.stderr and r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # nothing created


@pytest.mark.parametrize("args", [["nocmd"], ["--nope"]], ids=["unknown-command", "unknown-root-option"])
def test_root_usage_errors_are_one_line(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert one_line_error(r.stderr).endswith("; see 'twotower --help'")


@pytest.mark.parametrize("args", [[], ["gen"], ["stats"]], ids=["bare", "gen", "stats"])
def test_no_arguments_show_the_help_exit_0(args):
    """Bare `twotower` (or a command without its arguments) is a request for help, not an error."""
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.lstrip().startswith(f"Usage: twotower {' '.join(args)}".rstrip()) and r.stderr == ""


# ---- rows: more values of the wrong kind (each rejected with a reason, the good rows once) ------------

MORE_BAD_ROWS = {
    "gamma-1e999": (b'{"id": "x", "prompt": "1+1=", "gamma": 1e999}', "malformed JSON"),
    "gamma-minus-infinity": (b'{"id": "x", "prompt": "1+1=", "gamma": -Infinity}', "malformed JSON"),
    "max-new-tokens-10^29": (b'{"id": "x", "prompt": "1+1=", "max_new_tokens": 100000000000000000000000000000}',
                             "max_new_tokens must be a positive integer"),
    "seed-2^64": (b'{"id": "x", "prompt": "1+1=", "seed": 18446744073709551616}', "seed must be a non-negative"),
    "id-10^29": (b'{"id": 100000000000000000000000000000, "prompt": "1+1="}', "'id' must be a string or an integer"),
    "id-bool": (b'{"id": true, "prompt": "1+1="}', "'id' must be a string or an integer, got bool"),
    "id-float": (b'{"id": 3.0, "prompt": "1+1="}', "'id' must be a string or an integer"),
    "max-new-tokens-bool": (b'{"id": "x", "prompt": "1+1=", "max_new_tokens": true}', "max_new_tokens must be"),
    "temperature-string": (b'{"id": "x", "prompt": "1+1=", "temperature": "0.5"}', "temperature must be"),
    "lone-low-surrogate": (b'{"id": "x", "prompt": "\\udc00"}', "malformed JSON"),
    "top-level-array": (b'[{"id": "x", "prompt": "1+1="}]', "not a JSON object"),
    "messages-empty-list": (b'{"id": "x", "messages": []}', "'messages' must be a non-empty list"),
    "messages-a-string": (b'{"id": "x", "messages": "hi"}', "'messages' must be a non-empty list"),
    "message-without-role": (b'{"id": "x", "messages": [{"content": "hi"}]}', "messages[0]"),
    "message-role-a-number": (b'{"id": "x", "messages": [{"role": 5, "content": "hi"}]}', "messages[0]"),
    "prompt-and-messages": (b'{"id": "x", "prompt": "1+1=", "messages": [{"role": "user", "content": "x"}]}',
                            "both 'prompt' and 'messages'"),
    "prompt-null": (b'{"id": "x", "prompt": null}', "missing 'prompt' or 'messages'"),
    "mode-wrong-case": (b'{"id": "x", "prompt": "1+1=", "mode": "AR"}', "mode must be one of"),
    "line-over-16-MiB": (b'{"id": "x", "prompt": "' + b"a" * (16 << 20) + b'"}', "line longer than"),
}


@pytest.mark.parametrize("case", sorted(MORE_BAD_ROWS))
def test_more_bad_rows(model_dir, tmp_path, case):
    bad, words = MORE_BAD_ROWS[case]
    src = jsonl(tmp_path / "p.jsonl", [orjson.dumps(GOOD[0]), bad, orjson.dumps(GOOD[1])])
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert sorted(out_ids(out)) == ["g0", "g1"]
    (e,) = errors_of(out).values()
    assert e["line_no"] == 2 and words in e["reason"], e
    r = invoke(model_dir, str(src), "-o", str(out))  # the rerun: nothing twice
    assert r.exit_code == 0 and sorted(out_ids(out)) == ["g0", "g1"] and len(errors_of(out)) == 1


# ---- odd but valid inputs: read as documented, each row once ------------------------------------------

ODD_BUT_VALID = {
    # JSON leaves duplicate names undefined; like most parsers the last one wins (decided, not by chance)
    "duplicate-keys": (b'{"id": "a", "prompt": "0+0=", "prompt": "1+1="}\n{"id": "b", "id": "c", "prompt": "2+2="}\n',
                       {"a": "1+1=", "c": "2+2="}),
    "crlf-line-endings": (b'{"id": "a", "prompt": "1+1="}\r\n{"id": "b", "prompt": "2+2="}\r\n\r\n',
                          {"a": "1+1=", "b": "2+2="}),
    "utf8-bom": (b'\xef\xbb\xbf{"id": "a", "prompt": "1+1="}\n{"id": "b", "prompt": "2+2="}\n',
                 {"a": "1+1=", "b": "2+2="}),
    "no-final-newline": (b'{"id": "a", "prompt": "1+1="}\n{"id": "b", "prompt": "2+2="}', {"a": "1+1=", "b": "2+2="}),
    "nul-in-prompt": (b'{"id": "a", "prompt": "1\\u00001="}\n', {"a": "1\x001="}),
    "surrogate-pair-escape": (b'{"id": "a", "prompt": "\\ud83d\\ude00="}\n', {"a": "\U0001f600="}),
    "id-100k-chars": (b'{"id": "' + b"i" * 100_000 + b'", "prompt": "1+1="}\n', {"i" * 100_000: "1+1="}),
    "id-with-newline": (b'{"id": "a\\nb", "prompt": "1+1="}\n', {"a\nb": "1+1="}),
    "unknown-nested-field": (b'{"id": "a", "prompt": "1+1=", "zz_extra": {"deep": [1, [2, {"x": null}]]}}\n',
                             {"a": "1+1="}),
}


@pytest.mark.parametrize("case", sorted(ODD_BUT_VALID))
def test_odd_but_valid_inputs(model_dir, tmp_path, case):
    data, expect = ODD_BUT_VALID[case]
    src = tmp_path / "p.jsonl"
    src.write_bytes(data)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    got = {row["id"]: row["prompt"] for p in sorted(out.glob("part-*.parquet"))
           for row in pq.read_table(p, columns=["id", "prompt"]).to_pylist()}
    assert got == expect and not errors_of(out)
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0 and summary(r.stdout)["rows_written"] == 0 and len(out_ids(out)) == len(expect)


def test_rows_without_ids_get_the_same_ids_on_a_rerun(model_dir, tmp_path):
    src = jsonl(tmp_path / "p.jsonl", [{"id": None, "prompt": "1+1="}, {"prompt": "1+1="}, {"prompt": "2+2="}])
    out = tmp_path / "out"
    assert invoke(model_dir, str(src), "-o", str(out)).exit_code == 0
    first = sorted(out_ids(out))
    assert len(first) == len(set(first)) == 3 and all(i.startswith("h-") for i in first)
    r = invoke(model_dir, str(src), "-o", str(out))
    assert summary(r.stdout)["rows_written"] == 0 and sorted(out_ids(out)) == first


# ---- input files of the wrong kind -------------------------------------------------------------------


def test_zero_row_parquet_is_complete_and_writes_nothing(model_dir, tmp_path):
    src = tmp_path / "zero.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), src)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    s = summary(r.stdout)
    assert s["rows_written"] == 0 and s["complete"] and out_ids(out) == []


def test_parquet_without_a_prompt_column_is_one_line(model_dir, tmp_path):
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["1+1=", "2+2="]}), src)
    r = invoke(model_dir, str(src), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    one_line_error(r.stderr, "no 'prompt' or 'messages' column", "--prompt-field")


def test_jsonl_named_parquet_is_one_line(model_dir, tmp_path):
    src = jsonl(tmp_path / "lies.parquet", GOOD)
    r = invoke(model_dir, str(src), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    one_line_error(r.stderr, "lies.parquet", "not a readable Parquet")


@pytest.mark.parametrize("kind", ["parquet-named-jsonl", "plain-named-gz"])
def test_content_decides_the_format_over_the_name(model_dir, tmp_path, kind):
    if kind == "parquet-named-jsonl":
        src = tmp_path / "p.jsonl"
        pq.write_table(pa.table({"id": [g["id"] for g in GOOD], "prompt": [g["prompt"] for g in GOOD]}), src)
    else:
        src = jsonl(tmp_path / "p.jsonl.gz", GOOD)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert sorted(out_ids(out)) == [g["id"] for g in GOOD]


def test_gzip_with_trailing_garbage_keeps_its_rows(model_dir, tmp_path):
    src = tmp_path / "p.jsonl.gz"
    src.write_bytes(gzip.compress(b"".join(orjson.dumps(g) + b"\n" for g in GOOD)) + b"garbage")
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 2
    one_line_error(r.stderr, "p.jsonl.gz", f"the {len(GOOD)} row(s) read before it were kept")
    assert sorted(out_ids(out)) == [g["id"] for g in GOOD]


@pytest.mark.parametrize("kind", ["utf16", "random-bytes", "cr-only-line-ends"])
def test_undecodable_files_reject_rows_never_crash(model_dir, tmp_path, kind):
    src = tmp_path / "p.jsonl"
    if kind == "utf16":
        src.write_bytes("".join(json.dumps(g) + "\n" for g in GOOD).encode("utf-16"))
    elif kind == "random-bytes":
        import random

        src.write_bytes(random.Random(5).randbytes(20_000))
    else:  # classic Mac line ends: one line for JSONL, which cannot be a JSON object
        src.write_bytes(b"".join(orjson.dumps(g) + b"\r" for g in GOOD))
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert out_ids(out) == [] and summary(r.stdout)["rows_rejected"] == len(errors_of(out)) > 0


def _fifo_run(model_dir: Path, tmp_path: Path):
    import threading

    data = b"".join(orjson.dumps(g) + b"\n" for g in GOOD)
    fifo = tmp_path / "p.jsonl"
    os.mkfifo(fifo)

    def writer():
        with open(fifo, "wb") as f:
            f.write(data)

    threading.Thread(target=writer, daemon=True).start()
    out = tmp_path / "out"
    result = {}
    t = threading.Thread(target=lambda: result.update(r=invoke(model_dir, str(fifo), "-o", str(out))), daemon=True)
    t.start()
    t.join(15)
    hung = t.is_alive()
    while t.is_alive():  # a reader waiting for a writer that already left: open and close one (EOF)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody has it open for reading right now
            pass
        t.join(1)
    return hung, result["r"], out


def test_fifo_as_input_reads_every_row_once(model_dir, tmp_path):
    hung, r, out = _fifo_run(model_dir, tmp_path)
    assert not hung, "the run hung on the FIFO"
    assert r.exit_code == 0, r.stderr
    assert sorted(out_ids(out)) == [g["id"] for g in GOOD]


def _rows_with_a_hook(monkeypatch, after_first):
    """The run's reader, with `after_first()` called once the first row has been read."""
    import twotower_cli.pipeline as pipeline

    real = pipeline.read_rows

    class Hooked:
        def __init__(self, rows):
            self._rows, self._n = rows, 0

        def __iter__(self):
            return self

        def __next__(self):
            row = next(self._rows)
            self._n += 1
            if self._n == 1:
                after_first()
            return row

        def __getattr__(self, name):
            return getattr(self._rows, name)

    monkeypatch.setattr(pipeline, "read_rows", lambda *a, **k: Hooked(real(*a, **k)))


def test_input_deleted_mid_read_is_read_to_its_end(model_dir, tmp_path, monkeypatch):
    """An open file outlives its name: every row is still read, once."""
    rows = [{"id": f"d{i}", "prompt": f"{i}+2="} for i in range(40)]
    src = jsonl(tmp_path / "p.jsonl", rows)
    _rows_with_a_hook(monkeypatch, src.unlink)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert not src.exists() and sorted(out_ids(out)) == sorted(x["id"] for x in rows)


def test_input_truncated_mid_read_keeps_what_was_read_and_resumes(model_dir, tmp_path, monkeypatch):
    """Shrunk under the reader (8 MiB of blank lines keep the tail out of its first buffer): the rows
    read are kept; once the file is restored, the rerun does the rest, each row once."""
    head = [orjson.dumps({"id": f"a{i}", "prompt": f"{i}+3="}) + b"\n" for i in range(3)]
    tail = [orjson.dumps({"id": f"z{i}", "prompt": f"{i}+4="}) + b"\n" for i in range(3)]
    data = b"".join(head) + b" \n" * (4 << 20) + b"".join(tail)
    src = tmp_path / "p.jsonl"
    src.write_bytes(data)
    _rows_with_a_hook(monkeypatch, lambda: os.truncate(src, len(b"".join(head))))
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    first = out_ids(out)
    assert set(first) <= {f"a{i}" for i in range(3)} | {f"z{i}" for i in range(3)} and "a0" in first
    monkeypatch.undo()
    monkeypatch.setenv("TWOTOWER_CACHE_DIR", str(tmp_path / "digest-cache"))
    src.write_bytes(data)
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    ids = out_ids(out)
    assert sorted(ids) == sorted([f"a{i}" for i in range(3)] + [f"z{i}" for i in range(3)])  # each once


def test_source_path_with_nul_is_one_line(model_dir, tmp_path):
    r = invoke(model_dir, str(tmp_path / "p\x00.jsonl"), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    one_line_error(r.stderr, "null byte")


def test_empty_source_path_is_one_line(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke(model_dir, "", "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    one_line_error(r.stderr)


def test_symlink_loop_as_input(model_dir, tmp_path):
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    r = invoke(model_dir, str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "out"))
    assert r.exit_code == 2
    one_line_error(r.stderr, "a.jsonl", "Too many levels of symbolic links")


# ---- output paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["existing-file", "dangling-symlink", "symlink-loop"])
def test_output_path_that_cannot_be_a_directory(model_dir, tmp_path, kind):
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "out"
    if kind == "existing-file":
        out.write_text("precious")
    elif kind == "dangling-symlink":
        out.symlink_to(tmp_path / "nowhere")
    else:
        out.symlink_to(tmp_path / "loop")
        (tmp_path / "loop").symlink_to(out)
    r = invoke(model_dir, str(src), "-o", str(out))
    assert r.exit_code == 2
    one_line_error(r.stderr, str(out))
    if kind == "existing-file":
        assert out.read_text() == "precious"
    assert not (tmp_path / "nowhere").exists()


def test_output_through_a_symlink_to_a_directory(model_dir, tmp_path):
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for _ in range(2):
        assert invoke(model_dir, str(src), "-o", str(tmp_path / "link")).exit_code == 0
    assert sorted(out_ids(tmp_path / "real")) == [g["id"] for g in GOOD]


@pytest.mark.parametrize("name", ["new\nline", "-leading-dash", "ctl\x01\x1b[31m\u202eend", " spaced "])
def test_odd_output_names_work_and_resume(model_dir, tmp_path, name):
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / name
    for _ in range(2):
        r = invoke(model_dir, str(src), "-o", str(out))
        assert r.exit_code == 0, r.stderr
    assert sorted(out_ids(out)) == [g["id"] for g in GOOD]


def test_output_path_with_nul_is_one_line(model_dir, tmp_path):
    r = invoke(model_dir, str(jsonl(tmp_path / "p.jsonl", GOOD)), "-o", str(tmp_path / "out\x00x"))
    assert r.exit_code == 2
    one_line_error(r.stderr, "null byte")


def test_empty_output_path_is_refused(model_dir, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    r = invoke(model_dir, str(src), "-o", "")
    assert list(work.iterdir()) == [], "the run wrote into the current directory"
    assert r.exit_code == 2
    one_line_error(r.stderr)


# ---- numeric flags at their extremes -------------------------------------------------------------------

HUGE = "9" * 40


@pytest.mark.parametrize("flags", [["--limit", HUGE], ["--rows-per-shard", HUGE], ["--max-batch-tokens", HUGE],
                                   ["--max-batch-tokens", "1"], ["--log-every", "inf"], ["--limit", "1_000"]],
                         ids=["limit", "rows-per-shard", "max-batch-tokens", "max-batch-tokens-1", "log-every-inf",
                              "limit-underscores"])
def test_extreme_but_harmless_flag_values_run(model_dir, tmp_path, flags):
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out), *flags)
    assert r.exit_code == 0, r.stderr
    assert sorted(out_ids(out)) == [g["id"] for g in GOOD]


@pytest.mark.parametrize("flags, words", [(["--gamma", "1e400"], "gamma must be a finite number"),
                                          (["--num-shards", "2", "--shard-index", "2"], "--shard-index"),
                                          (["--num-shards", "0"], "--num-shards")],
                         ids=["gamma-overflows-to-inf", "shard-index-out-of-range", "num-shards-alone-zero"])
def test_out_of_range_flags_are_one_line(model_dir, tmp_path, flags, words):
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out), *flags)
    assert r.exit_code == 2, r.stderr
    one_line_error(r.stderr, words)
    assert not out.exists()


def test_huge_num_shards_is_one_line(model_dir, tmp_path):
    r = invoke(model_dir, str(jsonl(tmp_path / "p.jsonl", GOOD)), "-o", str(tmp_path / "out"),
               "--num-shards", HUGE, "--shard-index", "0")
    assert r.exit_code == 2
    one_line_error(r.stderr, "--num-shards")


def test_huge_max_batch_rows_is_one_line(model_dir, tmp_path):
    r = invoke(model_dir, str(jsonl(tmp_path / "p.jsonl", GOOD)), "-o", str(tmp_path / "out"),
               "--max-batch-rows", str(2**40))
    assert r.exit_code == 2
    one_line_error(r.stderr, "max-batch-rows")


def test_huge_threads_is_one_line(model_dir, tmp_path):
    r = invoke(model_dir, str(jsonl(tmp_path / "p.jsonl", GOOD)), "-o", str(tmp_path / "out"), "--threads", HUGE)
    assert r.exit_code == 2
    one_line_error(r.stderr, "threads")


def test_a_dtype_typo_does_not_bind_the_directory(model_dir, tmp_path):
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "out"
    r = invoke(model_dir, str(src), "-o", str(out), "--dtype", "float7")
    assert r.exit_code == 2
    one_line_error(r.stderr, "unknown dtype")
    r = invoke(model_dir, str(src), "-o", str(out), "--dtype", "float32")
    assert r.exit_code == 0, r.stderr


# ---- checkpoints ----------------------------------------------------------------------------------------


def _ckpt_copy(model_dir: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    d = tmp_path / name
    shutil.copytree(model_dir, d)
    return d


def test_a_same_shape_retrain_is_refused_on_resume(model_dir, tmp_path):
    """The fingerprint covers the weights' values, not only their names and shapes."""
    from safetensors.numpy import load_file, save_file

    ck = _ckpt_copy(model_dir, tmp_path)
    src = jsonl(tmp_path / "p.jsonl", GOOD[:2])
    out = tmp_path / "out"
    assert invoke(ck, str(src), "-o", str(out)).exit_code == 0
    w = ck / "model.safetensors"
    tensors = load_file(w)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] += 1  # one value, same shapes, same header
    save_file(tensors, w)
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    r = invoke(ck, str(src), "-o", str(out))
    assert r.exit_code == 2
    one_line_error(r.stderr, "checkpoint", "--overwrite")
    assert sorted(out_ids(out)) == ["g0", "g1"]


@pytest.mark.parametrize("rename", [False, True], ids=["same-name", "renamed"])
def test_a_moved_checkpoint_resumes(model_dir, tmp_path, rename):
    ck = _ckpt_copy(model_dir, tmp_path, "tiny")
    src = jsonl(tmp_path / "p.jsonl", GOOD[:2])
    out = tmp_path / "out"
    assert invoke(ck, str(src), "-o", str(out)).exit_code == 0
    moved = tmp_path / "elsewhere" / ("tiny-copy" if rename else "tiny")
    moved.parent.mkdir()
    shutil.move(ck, moved)
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    r = invoke(moved, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert summary(r.stdout)["rows_written"] == len(GOOD) - 2
    assert sorted(out_ids(out)) == [g["id"] for g in GOOD]


def _break(d: Path, kind: str) -> None:
    if kind == "truncated-weights":
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-1000])
    elif kind == "config-not-json":
        (d / "config.json").write_text("{not json")
    elif kind == "config-a-list":
        (d / "config.json").write_text("[]")
    elif kind == "index-escapes-the-directory":
        (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    elif kind == "header-not-json":
        w = d / "model.safetensors"
        b = bytearray(w.read_bytes())
        b[8:20] = b"{" * 12
        w.write_bytes(bytes(b))
    elif kind == "tokenizer-empty-object":
        (d / "tokenizer.json").write_text("{}")
    elif kind == "weights-a-fifo":
        (d / "model.safetensors").unlink()
        os.mkfifo(d / "model.safetensors")


BROKEN_CHECKPOINTS = ["truncated-weights", "config-not-json", "config-a-list", "index-escapes-the-directory",
                      "header-not-json", "tokenizer-empty-object", "weights-a-fifo"]


@pytest.mark.parametrize("kind", BROKEN_CHECKPOINTS)
def test_broken_checkpoints_are_one_line(model_dir, tmp_path, kind):
    ck = _ckpt_copy(model_dir, tmp_path)
    _break(ck, kind)
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = invoke(ck, str(src), "-o", str(out))
    assert time.monotonic() - t0 < 60
    assert r.exit_code == 2, r.stderr
    one_line_error(r.stderr)
    assert out_ids(out) == [] if out.exists() else True


def test_a_repaired_checkpoint_is_not_refused_by_an_empty_directory(model_dir, tmp_path):
    ck = _ckpt_copy(model_dir, tmp_path)
    good = (ck / "model.safetensors").read_bytes()
    _break(ck, "truncated-weights")
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "out"
    assert invoke(ck, str(src), "-o", str(out)).exit_code == 2
    (ck / "model.safetensors").write_bytes(good)
    r = invoke(ck, str(src), "-o", str(out))
    assert r.exit_code == 0, r.stderr


# ---- the environment ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["a-file", "under-proc", "corrupt-cache-file"])
def test_a_bad_digest_cache_never_fails_the_run(model_dir, tmp_path, monkeypatch, kind):
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    if kind == "a-file":
        monkeypatch.setenv("TWOTOWER_CACHE_DIR", str(src))
    elif kind == "under-proc":
        monkeypatch.setenv("TWOTOWER_CACHE_DIR", "/proc/twotower-cache")
    else:
        cache = tmp_path / "digest-cache"
        cache.mkdir(exist_ok=True)
        (cache / "weights-sha256.json").write_bytes(b"\x00garbage{")
    out = tmp_path / "out"
    for _ in range(2):
        r = invoke(model_dir, str(src), "-o", str(out))
        assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert sorted(out_ids(out)) == [g["id"] for g in GOOD] and src.read_bytes().startswith(b'{"id"')
