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
                                 "--gammas", "0.5,0.9", "--spec-gammas", "0.8", "--max-new-tokens", "8",
                                 "--block-size", "4", "--steps-per-block", "4", "--rounds", "2"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(x["mode"], x["gamma"]) for x in rows] == [("ar", None), ("speculative", 0.8), ("mock-ar", None),
                                                       ("diffusion", 0.5), ("diffusion", 0.9)]
    for x in rows:
        assert {"accuracy", "quality_vs_ar", "tokens_per_step", "tokens_per_s", "speedup_vs_ar", "batch",
                "accepted_per_round", "match_ar"} <= set(x)
        assert 0.0 <= x["accuracy"] <= 1.0 and x["tokens_per_s"] > 0 and 0.0 <= x["match_ar"] <= 1.0
        assert x["batch"] == 1 and (x["accepted_per_round"] is None) == (x["mode"] != "speculative")
    assert rows[0]["speedup_vs_ar"] == 1.0 and rows[0]["tokens_per_step"] == 1.0 and rows[0]["match_ar"] == 1.0
    assert rows[2]["tokens_per_step"] == 1.0  # mock-AR: one token per denoiser step


def test_bench_batches_side_by_side(random_ckpt):
    """`--batch 1,3`: every configuration at every batch size, each against AR of its own batch;
    speculative decoding is exact (AR's tokens on every row, so AR's accuracy)."""
    r = CliRunner().invoke(app, ["bench", "--model", str(random_ckpt), "--json", "--n-per-task", "1",
                                 "--gammas", "0.9", "--spec-gammas", "0.5,0.95", "--max-new-tokens", "12",
                                 "--block-size", "4", "--steps-per-block", "4", "--batch", "1,3", "--rounds", "1"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    configs = [("ar", None), ("speculative", 0.5), ("speculative", 0.95), ("mock-ar", None), ("diffusion", 0.9)]
    assert [(x["batch"], x["mode"], x["gamma"]) for x in rows] == [(b, m, g) for b in (1, 3) for m, g in configs]
    for b in (1, 3):
        group = [x for x in rows if x["batch"] == b]
        ar = group[0]
        assert ar["mode"] == "ar" and ar["speedup_vs_ar"] == 1.0 and ar["match_ar"] == 1.0
        assert ar["accepted_per_round"] is None
        for x in group:
            assert x["speedup_vs_ar"] == pytest.approx(x["tokens_per_s"] / ar["tokens_per_s"])
            assert x["quality_vs_ar"] == (pytest.approx(x["accuracy"] / ar["accuracy"]) if ar["accuracy"] else 0.0)
        for x in group[1:3]:
            assert x["mode"] == "speculative" and x["match_ar"] == 1.0 and x["accuracy"] == ar["accuracy"]
            assert x["accepted_per_round"] >= 1.0  # AR's own token at least, every verify


def test_bench_table_groups_by_batch(random_ckpt):
    r = CliRunner().invoke(app, ["bench", "--model", str(random_ckpt), "--n-per-task", "1", "--gammas", "0.9",
                                 "--spec-gammas", "0.8", "--max-new-tokens", "8", "--batch", "1,2",
                                 "--block-size", "4", "--steps-per-block", "4", "--rounds", "1"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "batch 1,2" in lines[0]
    b1, b2 = lines.index("batch 1"), lines.index("batch 2")
    for start, end in ((b1, b2), (b2, len(lines))):
        assert "speedup" in lines[start + 1] and "acc/rnd" in lines[start + 1]
        assert [ln.split()[0] for ln in lines[start + 2:end]] == ["ar", "speculative", "mock-ar", "diffusion"]


@pytest.mark.parametrize("bad", ["abc", "0", "1,-2", "2.5", ",", "8,x"])
def test_bench_rejects_bad_batch(random_ckpt, bad):
    r = CliRunner().invoke(app, ["bench", "--model", str(random_ckpt), "--batch", bad])
    assert r.exit_code == 2 and "--batch" in r.output
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error:")


def test_bench_rejects_bad_gammas(random_ckpt):
    r = CliRunner().invoke(app, ["bench", "--model", str(random_ckpt), "--gammas", "0.5,abc"])
    assert r.exit_code == 2 and "gammas" in r.output
    r = CliRunner().invoke(app, ["bench", "--model", str(random_ckpt), "--spec-gammas", "1.5"])
    assert r.exit_code == 2 and "--spec-gammas" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.slow  # the real bench on the embedded model, every mode
@pytest.mark.skipif(default_checkpoint() is None, reason="no embedded model in this build")
def test_bench_table_on_embedded_model():
    r = CliRunner().invoke(app, ["bench", "--n-per-task", "2", "--gammas", "0.8", "--spec-gammas", "0.8",
                                 "--max-new-tokens", "48"])
    assert r.exit_code == 0, r.output
    assert "diffusion" in r.stdout and "speculative" in r.stdout and "speedup" in r.stdout


def test_bench_interleaves_rounds_and_takes_the_median(random_ckpt, monkeypatch, capsys):
    """Passes run every (batch, configuration) in turn (a load burst hits one pass of each, not all
    of one); each row's tokens/s comes from its median pass, its speed-up from AR's of its batch."""
    from twotower_cli.commands import bench as cmd

    calls = []
    walls = {"ar": [4.0, 1.0, 2.0], "speculative": [3.0, 1.0, 0.5], "mock-ar": [8.0, 8.0, 8.0],
             "diffusion": [9.0, 0.5, 1.0]}

    def fake(model, tok, items, mode, gamma, batch, *a):
        full = len(items) > 2  # the warm-up decodes 2 prompts
        if full:
            calls.append((batch, mode))
        wall = walls[mode][sum(c == (batch, mode) for c in calls) - 1] * batch if full else 1.0
        return {"mode": mode, "gamma": gamma, "batch": batch, "accuracy": 1.0, "per_task": {"copy": 1.0},
                "tokens_per_step": 1.0, "accepted_per_round": 2.0 if mode == "speculative" else None,
                "tokens_per_s": 100 / wall, "completion_tokens": 100, "wall_s": wall,
                "outputs": {0: [1, 2] if mode in ("ar", "speculative") else [1, 3], 1: [4]}}

    monkeypatch.setattr(cmd, "evaluate", fake)
    cmd.run(random_ckpt, DecodeParams(block_size=16, steps_per_block=16, max_new_tokens=8), (0.8,), (0.9,),
            as_json=True, n_per_task=1, batches=(1, 4), threads=None, seed=0, rounds=3)
    one_pass = [(b, m) for b in (1, 4) for m in ("ar", "speculative", "mock-ar", "diffusion")]
    assert calls == one_pass * 3
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["batch"], r["mode"]) for r in rows] == one_pass
    # medians: 2.0, 1.0, 8.0, 1.0 s (x4 at batch 4)
    assert [r["tokens_per_s"] for r in rows] == [50.0, 100.0, 12.5, 100.0, 12.5, 25.0, 3.125, 25.0]
    assert [r["speedup_vs_ar"] for r in rows] == [1.0, 2.0, 0.25, 2.0] * 2
    assert [r["match_ar"] for r in rows] == [1.0, 1.0, 0.5, 0.5] * 2
    assert [r["accepted_per_round"] for r in rows] == [None, 2.0, None, None] * 2
    assert all("outputs" not in r for r in rows)
