"""Speculative mode: the denoiser drafts, the context tower verifies; the output is AR's, token
for token (engine/reference.py's AR loop is the spec), greedy and sampled, at any batch."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from model_helpers import peaked_model

from twotower_cli.config import DecodeParams
from twotower_cli.engine import Engine, Request
from twotower_cli.engine import reference as ref
from twotower_cli.engine.generation import load_model
from twotower_cli.engine.request import row_key
from twotower_cli.model.checkpoint import default_checkpoint

EOS = {2}


@pytest.fixture(scope="module")
def peaked():
    return peaked_model(seed=5)


def prompts(n: int, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def decode(model, rows, params, max_batch_rows=4, eos=EOS, **kw):
    reqs = [Request(str(i), r, p) for i, (r, p) in enumerate(zip(rows, params))]
    out = {r.id: r for r in Engine(model, max_batch_rows=max_batch_rows, eos_ids=eos, **kw).run(reqs)}
    assert sorted(out, key=int) == [str(i) for i in range(len(rows))]
    return [out[str(i)] for i in range(len(rows))]


def ar_alone(model, row, p, i, eos=EOS):
    return ref.generate_ar(model, [row], [p.replace(mode="ar")], [row_key(str(i))], eos)[0][0]


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 3), (0.7, 11), (1.5, 4)])
def test_speculative_equals_ar_batch1(peaked, temperature, seed):
    rows = prompts(5, seed=seed)
    for gamma, S in ((0.5, 8), (0.9, 4), (0.5, 1)):  # S = 1: no drafts, every round a verify (AR)
        params = [DecodeParams(mode="speculative", gamma=gamma, block_size=S, steps_per_block=S,
                               temperature=temperature, seed=seed, max_new_tokens=7 + 5 * i) for i in range(len(rows))]
        res = decode(peaked, rows, params, max_batch_rows=1)
        for i, (row, p, r) in enumerate(zip(rows, params, res)):
            assert r.tokens == ar_alone(peaked, row, p, i), (gamma, S, i)
            assert r.stats.mode == "speculative" and r.stats.context_forwards >= 1


def test_speculative_beside_other_modes_with_refills(peaked):
    """Mixed batches: speculative rows share forwards with diffusion, AR and mock-AR rows, slots
    refill as rows finish; every speculative row is still AR's output."""
    rows = prompts(12, seed=8)
    modes = ["speculative", "diffusion", "speculative", "ar", "mock-ar", "speculative"]
    params = [DecodeParams(mode=modes[i % len(modes)], gamma=[0.4, 0.7, 0.95][i % 3], block_size=8, steps_per_block=8,
                           temperature=[0.0, 1.0][i % 2], seed=i, max_new_tokens=5 + 3 * (i % 5))
              for i in range(len(rows))]
    res = decode(peaked, rows, params, max_batch_rows=3)
    alone = decode(peaked, rows, params, max_batch_rows=1)
    assert [r.tokens for r in res] == [r.tokens for r in alone]
    for i, (row, p, r) in enumerate(zip(rows, params, res)):
        if p.mode == "speculative":
            assert r.tokens == ar_alone(peaked, row, p, i), i


@pytest.mark.parametrize("overlap,mirror", [(True, False), (False, True), (True, True)])
def test_speculative_rollback_with_the_two_device_mirror(peaked, overlap, mirror):
    """The denoiser reads a mirror of the context state (two devices): a verify's rollback reaches
    the mirror too, so drafts and tokens are those of the single-state run."""
    rows = prompts(6, seed=21)
    params = [DecodeParams(mode="speculative" if i % 3 else "diffusion", gamma=0.6, block_size=8, steps_per_block=8,
                           temperature=float(i % 2), seed=i, max_new_tokens=18) for i in range(len(rows))]
    plain = decode(peaked, rows, params, max_batch_rows=3, overlap=False, mirror=False)
    other = decode(peaked, rows, params, max_batch_rows=3, overlap=overlap, mirror=mirror)
    assert [r.tokens for r in other] == [r.tokens for r in plain]
    for r, o in zip(plain, other):  # the same decoding; timings and float sums may differ by rounding
        assert replace(o.stats, latency_s=0.0, ar_logprob=None) == replace(r.stats, latency_s=0.0, ar_logprob=None)
        assert o.stats.ar_logprob == pytest.approx(r.stats.ar_logprob, abs=1e-4)


def test_speculative_stats(peaked):
    p = DecodeParams(mode="speculative", gamma=0.5, block_size=8, steps_per_block=8, max_new_tokens=30)
    (r,) = decode(peaked, [[7, 8, 9]], [p], eos=set())
    rounds = r.stats.context_forwards - 1  # the prefill gave AR's first token; each round verified once
    assert len(r.tokens) == 30 and rounds >= 1 and r.stats.denoiser_steps >= rounds
    assert 1 <= r.stats.accepted_per_round <= 8
    assert r.stats.tokens_per_step == 30 / r.stats.denoiser_steps
    (d,) = decode(peaked, [[7, 8, 9]], [p.replace(mode="diffusion")], eos=set())
    assert d.stats.accepted_per_round is None


@pytest.mark.skipif(default_checkpoint() is None, reason="no embedded checkpoint in assets/tiny")
def test_speculative_equals_ar_on_the_shipped_model():
    from twotower_cli.model.tokenizer import load_tokenizer
    from twotower_cli.training.tasks import eval_set

    path = default_checkpoint()
    model, tok = load_model(path), load_tokenizer(path)
    rows = [tok.encode(p) for _, p, _ in eval_set(2, seed=5)]
    eos = set(model.config.eos_ids)
    for gamma, temperature in ((0.5, 0.0), (0.8, 0.0), (0.95, 1.0)):
        params = [DecodeParams(mode="speculative", gamma=gamma, temperature=temperature, seed=2, max_new_tokens=48)
                  for _ in rows]
        for batch in (1, 4):
            res = decode(model, rows, params, max_batch_rows=batch, eos=eos)
            for i, (row, p, r) in enumerate(zip(rows, params, res)):
                assert r.tokens == ar_alone(model, row, p, i, eos=eos), (gamma, batch, i)
            assert sum(r.stats.accepted_per_round for r in res) / len(res) > 2  # drafts are accepted
