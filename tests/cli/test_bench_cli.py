"""`twotower bench` end to end on a small slice (the numbers themselves are benchmarks, not tests)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from twotower_cli import DecodeParams, ModelConfig, TwoTower, save_pretrained
from twotower_cli.cli import app
from twotower_cli.model.checkpoint import default_checkpoint
from twotower_cli.training.tokenizer_build import save_tokenizer, vocab


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("rand")
    save_pretrained(TwoTower(ModelConfig.tiny(vocab_size=len(vocab())), seed=0), d)
    save_tokenizer(d)
    return d


def test_bench_json_rows(random_ckpt):
    r = CliRunner().invoke(app, ["bench", "--model", str(random_ckpt), "--json", "--n-per-task", "1",
                                 "--gammas", "0.5,0.9", "--max-new-tokens", "8", "--rounds", "2"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(x["mode"], x["gamma"]) for x in rows] == [("ar", None), ("mock-ar", None), ("diffusion", 0.5),
                                                       ("diffusion", 0.9)]
    for x in rows:
        assert {"accuracy", "quality_vs_ar", "tokens_per_step", "tokens_per_s", "speedup_vs_ar"} <= set(x)
        assert 0.0 <= x["accuracy"] <= 1.0 and x["tokens_per_s"] > 0
    assert rows[0]["speedup_vs_ar"] == 1.0 and rows[0]["tokens_per_step"] == 1.0


def test_bench_rejects_bad_gammas(random_ckpt):
    r = CliRunner().invoke(app, ["bench", "--model", str(random_ckpt), "--gammas", "0.5,abc"])
    assert r.exit_code == 2 and "gammas" in r.output


@pytest.mark.skipif(default_checkpoint() is None, reason="no embedded model in this build")
def test_bench_table_on_embedded_model():
    r = CliRunner().invoke(app, ["bench", "--n-per-task", "2", "--gammas", "0.8", "--max-new-tokens", "48"])
    assert r.exit_code == 0, r.output
    assert "diffusion" in r.stdout and "speedup" in r.stdout


def test_bench_interleaves_rounds_and_takes_the_median(random_ckpt, monkeypatch, capsys):
    """Passes run every configuration in turn (a load burst hits one pass of each, not all of one);
    each row's tokens/s comes from its median pass."""
    from twotower_cli.commands import bench as cmd

    calls = []
    walls = {"ar": [4.0, 1.0, 2.0], "mock-ar": [8.0, 8.0, 8.0], "diffusion": [9.0, 0.5, 1.0]}

    def fake(model, tok, items, mode, gamma, *a):
        full = len(items) > 2  # the warm-up decodes 2 prompts
        if full:
            calls.append(mode)
        wall = walls[mode][sum(c == mode for c in calls) - 1] if full else 1.0
        return {"mode": mode, "gamma": gamma, "accuracy": 1.0, "per_task": {"copy": 1.0},
                "tokens_per_step": 1.0, "tokens_per_s": 100 / wall, "completion_tokens": 100, "wall_s": wall}

    monkeypatch.setattr(cmd, "evaluate", fake)
    cmd.run(random_ckpt, DecodeParams(block_size=16, steps_per_block=16, max_new_tokens=8), (0.8,), as_json=True,
            n_per_task=1, batch=1, threads=None, seed=0, rounds=3)
    assert calls == ["ar", "mock-ar", "diffusion"] * 3
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["tokens_per_s"] for r in rows] == [50.0, 12.5, 100.0]  # medians: 2.0, 8.0, 1.0 s
    assert rows[2]["speedup_vs_ar"] == 2.0
