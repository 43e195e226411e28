"""An adversarial pass over `twotower gen` (issue: hardening, part A): bad inputs and flag values,
each giving a documented exit code, one line on stderr (never a traceback), and every good row
written exactly once. In-process cases use typer's CliRunner; signal cases are real processes (slow)."""

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
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
FAST = ["--block", "4", "--max-new-tokens", "6", "--max-batch-rows", "8", "-q"]
runner = CliRunner()
GOOD = [{"id": f"g{i}", "prompt": f"{i}+{i}="} for i in range(4)]


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
                            stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
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
# (A SIGTERM ~1 s in, while the model loads, was once seen to end the process by SIGINT after the
# "interrupted" line: an open bug, in the closing note; no xfail test stands in for it.)
def test_signal_at_the_first_moments_exits_3(model_dir, tmp_path, delays):
    """Signals at several moments of start-up, before and after `main`: never 143, never a traceback."""
    src = jsonl(tmp_path / "p.jsonl", GOOD)
    for i, delay in enumerate(delays):
        proc = subprocess.Popen([sys.executable, "-m", "twotower_cli", "gen", str(src), "-o", str(tmp_path / f"o{i}"),
                                 "--model", str(model_dir), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=ENV, cwd=ROOT)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # finished before the signal
        assert proc.returncode == 3, (delay, stderr.decode())
        assert "Traceback" not in stderr.decode()
