"""The AR score of every row, every mode: the context tower's log probability of the completion
(and its greedy agreement) equals a full causal forward over prompt + completion."""

from __future__ import annotations

import random

import pytest
import torch
from model_helpers import peaked_model

from twotower_cli.config import DecodeParams
from twotower_cli.engine import Engine, Request

MODES = ("diffusion", "mock-ar", "ar", "speculative")


@pytest.fixture(scope="module")
def peaked():
    return peaked_model(seed=9)


def full_forward_score(model, prompt: list[int], completion: list[int]) -> tuple[float, float]:
    """Σ log p(completion[i] | prompt + completion[:i]) and the greedy-agreement share, from one
    causal forward."""
    with torch.no_grad():
        logits = model.context_logits(torch.tensor([prompt + completion]))[0]  # (L, V)
    pred = logits[len(prompt) - 1 : -1]  # the logits that predict each completion token
    target = torch.tensor(completion)
    lp = torch.log_softmax(pred, -1).gather(-1, target[:, None])[:, 0]
    return float(lp.sum()), float((pred.argmax(-1) == target).float().mean())


@pytest.mark.parametrize("overlap,mirror", [(False, False), (True, True)])
def test_ar_score_equals_a_full_forward(peaked, overlap, mirror):
    rng = random.Random(4)
    rows = [[rng.randrange(5, 256) for _ in range(rng.randint(2, 10))] for _ in range(16)]
    # every mode with limits inside the first block, at a block's end and a few blocks in
    params = [DecodeParams(mode=MODES[i % 4], gamma=0.6, block_size=4, steps_per_block=4, temperature=float(i % 3 == 1),
                           seed=i, max_new_tokens=[3, 8, 13, 17][i // 4]) for i in range(len(rows))]
    eos = {rows[0][1], 7}  # tokens this model emits now and then: some rows end at an EOS
    reqs = [Request(str(i), r, p) for i, (r, p) in enumerate(zip(rows, params))]
    engine = Engine(peaked, max_batch_rows=3, eos_ids=eos, ar_score=True, overlap=overlap, mirror=mirror)
    res = {r.id: r for r in engine.run(reqs)}
    plain = {r.id: r.tokens for r in Engine(peaked, max_batch_rows=3, eos_ids=eos).run(reqs)}
    for i, (row, p) in enumerate(zip(rows, params)):
        r = res[str(i)]
        assert r.tokens == plain[str(i)]  # scoring changes no token
        lp, agree = full_forward_score(peaked, row, r.tokens)
        assert r.stats.ar_logprob == pytest.approx(lp, abs=1e-4), (p.mode, i)
        assert r.stats.ar_agreement == pytest.approx(agree), (p.mode, i)
        if p.mode == "ar" and p.temperature == 0:
            assert r.stats.ar_agreement == 1.0
    assert any(res[str(i)].stats.finish_reason == "eos" for i in range(len(rows)))


def test_ar_score_default_scores_the_rows_where_it_is_free(peaked):
    """ar_score=None (the default): AR and speculative rows are scored (their context logits are
    computed anyway), diffusion and mock-AR rows are not (a scoring read costs them a forward);
    False scores no row."""
    reqs = [Request(m, [5, 6, 7], DecodeParams(mode=m, max_new_tokens=9, block_size=4, steps_per_block=4))
            for m in MODES]
    by_mode = {r.id: r for r in Engine(peaked, max_batch_rows=4).run(reqs)}
    for m in ("ar", "speculative"):
        lp, agree = full_forward_score(peaked, [5, 6, 7], by_mode[m].tokens)
        assert by_mode[m].stats.ar_logprob == pytest.approx(lp, abs=1e-4) and by_mode[m].stats.ar_agreement == agree
    for m in ("diffusion", "mock-ar"):
        assert by_mode[m].stats.ar_logprob is None and by_mode[m].stats.ar_agreement is None
    for r in Engine(peaked, max_batch_rows=4, ar_score=False).run(reqs):
        assert r.stats.ar_logprob is None and r.stats.ar_agreement is None
