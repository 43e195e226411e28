"""`twotower gen` in shell pipelines and cron: `-o -` JSON lines, log lines without a terminal,
no-op reruns that never load the model, clear endings and the small edges (issue: pipes & cron)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from test_gen_cli import ENV, FAST, ROOT, gen, one_line_error, prompts, summary_of, write_jsonl
from typer.testing import CliRunner

from twotower_cli.cli import app
from twotower_cli.io.schema import COLUMN_NAMES

runner = CliRunner()


def test_stream_to_stdout_every_row_once_summary_on_stderr(model_dir, tmp_path):
    rows = prompts(12)
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    r = gen(model_dir, str(src), "-o", "-")
    lines = r.stdout.splitlines()
    recs = [json.loads(ln) for ln in lines]
    assert sorted(x["id"] for x in recs) == sorted(x["id"] for x in rows)  # every row, once
    assert all(list(x) == COLUMN_NAMES for x in recs)  # the Parquet columns, in order
    assert all(x["created_at"].endswith("Z") for x in recs)
    s = json.loads(r.stderr.strip().splitlines()[-1])  # the summary went to stderr
    assert s["out_dir"] == "-" and s["rows_written"] == 12 and s["complete"] and s["errors_file"] is None
    assert not (tmp_path / "-").exists() and not Path("-").exists()  # no directory named -


def test_stream_from_stdin_to_stdout(model_dir, tmp_path):
    rows = prompts(5)
    data = b"".join(orjson.dumps(x) + b"\n" for x in rows)
    r = gen(model_dir, "-", "-o", "-", input=data)
    assert sorted(json.loads(ln)["id"] for ln in r.stdout.splitlines()) == sorted(x["id"] for x in rows)


def test_stream_reports_rejects_on_stderr(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [*prompts(2), b"{bad json"])
    r = gen(model_dir, str(src), "-o", "-", quiet=False)
    assert len(r.stdout.splitlines()) == 2
    rejected = [ln for ln in r.stderr.splitlines() if ln.startswith("rejected: ")]
    assert len(rejected) == 1 and json.loads(rejected[0][len("rejected: "):])["line_no"] == 3


def test_no_terminal_logs_plain_progress_lines(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", prompts(6))
    r = gen(model_dir, str(src), "-o", str(tmp_path / "out"), "--log-every", "0.01", quiet=False)
    logs = [ln for ln in r.stderr.splitlines() if ln.startswith("gen: ")]
    assert logs, r.stderr
    last = logs[-1]  # the same line at the end
    for part in ("6/6 rows", "rows/s", "tok/s", "tok/step", "0 rejected", "elapsed"):
        assert part in last, last
    assert "\x1b[" not in r.stderr  # no terminal control codes in a log


def test_log_lines_are_periodic():
    from twotower_cli.pipeline import Progress
    from twotower_cli.progress import LogLines

    p = Progress(phase="generating", decode_started=time.perf_counter())
    buf = io.StringIO()
    with LogLines(p, 100, every=0.02, stream=buf):
        for _ in range(10):
            p.rows += 1
            p.tokens += 3
            p.steps += 1
            time.sleep(0.02)
        p.phase = "done"
    lines = buf.getvalue().splitlines()
    assert len(lines) >= 3 and all(ln.startswith("gen: ") for ln in lines)
    assert "10/100 rows (10.0%)" in lines[-1] and "3.00 tok/step" in lines[-1] and "ETA" not in lines[-1]
    assert "ETA" in lines[0]


def test_noop_rerun_never_loads_the_model(model_dir, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "p.jsonl", prompts(5))
    out = tmp_path / "out"
    gen(model_dir, str(src), "-o", str(out))
    import twotower_cli.model.checkpoint as ckpt

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ckpt, "load_model", no_load)
    r = gen(model_dir, str(src), "-o", str(out), quiet=False)
    s = summary_of(r.stdout)
    assert s["nothing_to_do"] and s["rows_written"] == 0 and s["rows_skipped_done"] == 5 and s["complete"]
    assert s["model_load_s"] is None and s["exit_code"] == 0
    assert f"nothing to do: 5 rows already in {out}" in r.stderr


def test_noop_rerun_with_a_changed_checkpoint_is_refused(model_dir, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(model_dir, ck)
    src = write_jsonl(tmp_path / "p.jsonl", prompts(3))
    out = tmp_path / "out"
    gen(ck, str(src), "-o", str(out))
    cfg = json.loads((ck / "config.json").read_text())
    cfg["note"] = "changed"
    (ck / "config.json").write_text(json.dumps(cfg))
    r = gen(ck, str(src), "-o", str(out), code=2, quiet=False)
    assert "checkpoint" in one_line_error(r.stderr)


def test_limit_is_not_complete_and_the_rest_resumes(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", prompts(6))
    out = tmp_path / "out"
    s = summary_of(gen(model_dir, str(src), "-o", str(out), "--limit", "2").stdout)
    assert s["rows_written"] == 2 and not s["complete"] and not s["interrupted"] and s["exit_code"] == 0
    s = summary_of(gen(model_dir, str(src), "-o", str(out), "--limit", "6").stdout)
    assert s["rows_written"] == 4 and s["complete"]  # exactly the whole input
    r = runner.invoke(app, ["stats", str(out), "--json"])
    assert json.loads(r.stdout)["complete"] is True


def test_stats_on_a_directory_without_a_run_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "empty", tmp_path / "missing"):
        r = runner.invoke(app, ["stats", str(d)])
        assert r.exit_code == 2 and r.stdout == ""
        assert one_line_error(r.stderr)


def test_stats_tokens_per_step_equals_the_summary(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [dict(x, mode=m) for x, m in
                                             zip(prompts(8), ["ar", "diffusion", "mock-ar", "diffusion"] * 2)])
    out = tmp_path / "out"
    s = summary_of(gen(model_dir, str(src), "-o", str(out)).stdout)
    st = json.loads(runner.invoke(app, ["stats", str(out), "--json"]).stdout)
    assert st["tokens_per_step"]["mean"] == pytest.approx(s["mean_tokens_per_step"], abs=1e-3)


def test_too_long_prompt_error_record_has_an_excerpt(model_dir, tmp_path):
    cfg = json.loads((model_dir / "config.json").read_text())
    long = "1+" * cfg["max_position_embeddings"]
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": "long", "prompt": long}, *prompts(1)])
    out = tmp_path / "out"
    s = summary_of(gen(model_dir, str(src), "-o", str(out)).stdout)
    assert s["rows_rejected"] == 1
    errs = [json.loads(ln) for ln in (out / ".errors.jsonl").read_text().splitlines()]
    assert errs[0]["id"] == "long" and "too long" in errs[0]["reason"] and errs[0]["raw"].startswith("1+1+")
    # and a rerun does not load the model for a row that would be rejected again
    r = gen(model_dir, str(src), "-o", str(out), quiet=False)
    assert summary_of(r.stdout)["nothing_to_do"] and "1 rejected" in r.stderr


@pytest.mark.slow  # real subprocesses
def test_stream_into_head_exits_quietly(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", prompts(40))
    cmd = (f"{sys.executable} -m twotower_cli gen {src} -o - --model {model_dir} {' '.join(FAST)} "
           "| head -n 2")
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, env=ENV, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert len(p.stdout.splitlines()) == 2 and b"Traceback" not in p.stderr and b"BrokenPipe" not in p.stderr


@pytest.mark.slow  # real subprocesses
def test_noop_rerun_imports_no_torch(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", prompts(3))
    out = tmp_path / "out"
    gen(model_dir, str(src), "-o", str(out))
    argv = ["twotower", "gen", str(src), "-o", str(out), "--model", str(model_dir), *FAST]
    code = (f"import sys; from twotower_cli.cli import main; sys.argv = {argv!r}\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["nothing_to_do"]


@pytest.mark.slow
def test_stats_imports_no_torch(model_dir, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", prompts(2))
    out = tmp_path / "out"
    gen(model_dir, str(src), "-o", str(out))
    code = (f"import sys; from twotower_cli.cli import main; sys.argv = ['twotower', 'stats', {str(out)!r}];\ntry:\n"
            "    main()\nexcept SystemExit as e:\n    assert not e.code\nassert 'torch' not in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr.decode()


def test_cuda_asked_for_without_cuda_touches_no_directory(model_dir, tmp_path):
    """A device the machine lacks is refused before the output directory is created."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    src = write_jsonl(tmp_path / "p.jsonl", prompts(2))
    out = tmp_path / "out"
    r = gen(model_dir, str(src), "-o", str(out), "--device", "cuda", code=2, quiet=False)
    assert "CUDA is not available" in one_line_error(r.stderr)
    assert not out.exists()


def test_another_dtype_is_refused_on_resume(model_dir, tmp_path):
    """The run fingerprint covers --dtype: resuming with another one is refused (exit 2)."""
    src = write_jsonl(tmp_path / "p.jsonl", prompts(3))
    out = tmp_path / "out"
    gen(model_dir, str(src), "-o", str(out), "--limit", "1")
    r = gen(model_dir, str(src), "-o", str(out), "--dtype", "bfloat16", code=2, quiet=False)
    assert "dtype" in one_line_error(r.stderr)
