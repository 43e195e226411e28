"""`twotower stats` over every format, and the repetition column's distribution."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower_cli.commands import stats as stats_cmd
from twotower_cli.io.rundir import MANIFEST, RunDir, RunDirError
from twotower_cli.io.stats import read_run, render_summary, repetition_bin_labels

FP = {"model": "tiny@0123", "decode": {"gamma": 0.8}}
T0 = datetime(2026, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
REPS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.299, 0.3, 0.49, 0.5, 0.69, 0.7, 0.85, 0.9, 1.0, None, None]


def records() -> list[dict]:
    modes = ["diffusion", "ar", "speculative", "mock-ar", None]
    finish = ["eos", "length", "stop", None]
    out = []
    for i, r in enumerate(REPS):
        out.append({
            "id": f"r{i // 2}", "sample_index": i % 2, "prompt": "p", "completion": "c" * i, "chat": i % 3 == 0,
            "mode": modes[i % 5], "finish_reason": finish[i % 4], "prompt_tokens": 3 + i,
            "completion_tokens": i * 2 if i % 7 else None, "denoiser_steps": i, "context_forwards": i % 4,
            "tokens_per_step": [None, 1.0, 1.7, 3.2, 5.0, 13.5, 20.0][i % 7],
            "latency_s": 0.5 + i / 8 if i % 5 else None,
            "repetition": r, "model": "m", "metadata": '{"k": 1}' if i % 2 else None,
            "created_at": T0 + timedelta(seconds=i, microseconds=i * 1111),
        })
    return out


def write(out, fmt, rows, **kw) -> None:
    with RunDir(out, FP, format=fmt, rows_per_shard=5, **kw) as run:
        for r in rows:
            run.add(r)
        run.close(complete=True)


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_stats_of_a_line_run_equal_those_of_its_parquet_twin(tmp_path, fmt):
    write(tmp_path / "pq", "parquet", records())
    write(tmp_path / fmt, fmt, records())
    a, b = read_run(tmp_path / "pq"), read_run(tmp_path / fmt)
    assert (a.pop("out_dir"), a.pop("format"), b.pop("out_dir"), b.pop("format")) == (
        str(tmp_path / "pq"), "parquet", str(tmp_path / fmt), fmt)
    assert a["rows"] == len(REPS) and a["shards"] == 4
    assert a["modes"]["ar"] == 3 and a["throughput"]["wall_s"] is not None
    assert b == a
    # without a manifest the shards' extension and the lines' shape say which format they are
    (tmp_path / fmt / MANIFEST).unlink()
    c = read_run(tmp_path / fmt)
    assert c["rows"] == a["rows"] and c["repetition"] == a["repetition"] and c["modes"] == a["modes"]


def test_repetition_histogram_mean_and_share(tmp_path):
    out = tmp_path / "out"
    write(out, "parquet", records())
    rep = read_run(out)["repetition"]
    assert repetition_bin_labels() == ["0-0.1", "0.1-0.2", "0.2-0.3", "0.3-0.5", "0.5-0.7", "0.7-0.9", "0.9-1"]
    # [0, .1) [.1, .2) [.2, .3) [.3, .5) [.5, .7) [.7, .9) [.9, 1]: each bin closed on the left, the last on both sides
    assert rep["histogram"] == {"0-0.1": 2, "0.1-0.2": 2, "0.2-0.3": 2, "0.3-0.5": 2, "0.5-0.7": 2,
                                "0.7-0.9": 2, "0.9-1": 2}
    scored = [r for r in REPS if r is not None]
    assert rep["scored"] == 14 and rep["unscored"] == 2
    assert rep["mean"] == pytest.approx(sum(scored) / 14)
    assert rep["share_ge_0_5"] == pytest.approx(6 / 14)
    text = render_summary(read_run(out))
    assert "repetition  mean 0.445, >= 0.5 in 42.9% of 14 scored row(s) (2 unscored)" in text
    assert "    0.9-1          2  " in text


def test_repetition_of_a_run_without_scores(tmp_path):
    out = tmp_path / "out"
    write(out, "jsonl", [dict(r, repetition=None) for r in records()[:3]])
    rep = read_run(out)["repetition"]
    assert rep == {"scored": 0, "unscored": 3, "mean": None, "share_ge_0_5": None,
                   "histogram": dict.fromkeys(repetition_bin_labels(), 0)}
    assert "repetition  - (3 unscored row(s))" in render_summary(read_run(out))


def test_stats_reads_only_the_columns_it_needs(tmp_path, monkeypatch):
    out = tmp_path / "out"
    extra = [pa.field("big", pa.string())]
    write(out, "parquet", [dict(r, big="x" * 1000) for r in records()], extra_fields=extra)
    asked = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, columns=None, **kw):
        asked.append(list(columns))
        return real(self, *a, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert read_run(out)["rows"] == len(REPS)
    assert asked and all("big" not in c and "completion" not in c and "prompt" not in c for c in asked)
    assert all("repetition" in c for c in asked)


def test_a_damaged_line_shard_is_one_line(tmp_path):
    out = tmp_path / "out"
    write(out, "openai", records())
    p = out / "part-00001.jsonl"
    lines = p.read_bytes().splitlines(keepends=True)
    p.write_bytes(b"".join(lines[:2]) + b"{oops\n" + b"".join(lines[3:]))
    with pytest.raises(RunDirError, match=r"cannot read part-00001\.jsonl line 3: not JSON") as e:
        read_run(out)
    assert "\n" not in str(e.value)


def test_stats_command_prints_the_repetition_in_json(tmp_path, capsys):
    out = tmp_path / "out"
    write(out, "jsonl", records())
    stats_cmd.run(out, as_json=True)
    s = json.loads(capsys.readouterr().out)
    assert s["format"] == "jsonl" and s["rows"] == len(REPS)
    assert s["repetition"]["histogram"]["0.3-0.5"] == 2 and s["repetition"]["scored"] == 14
    stats_cmd.run(out, as_json=False)
    assert "repetition  mean" in capsys.readouterr().out
