"""The streamlined engine against the executable spec (engine/reference.py), token for token."""

from __future__ import annotations

import math
import random

import pytest
import torch

from twotower_cli.config import DecodeParams, ModelConfig
from twotower_cli.engine import Engine, Request
from twotower_cli.engine import reference as ref
from twotower_cli.engine.decode import commit_mask
from twotower_cli.engine.generation import TwoTowerForGeneration as TwoTower
from twotower_cli.engine.request import row_key

REF = {"ar": ref.generate_ar, "mock-ar": ref.generate_mock_ar, "diffusion": ref.generate_mask_diffusion}
EOS = {2}


@pytest.fixture(scope="module")
def model() -> TwoTower:
    return TwoTower(ModelConfig.tiny(), seed=0).eval()


@pytest.fixture(scope="module")
def peaked() -> TwoTower:
    """Random weights with sharper output distributions. A random model's decisions sit on
    near-ties that floating-point batch effects (~1e-7) can flip; heads scaled x8 give them margins,
    as a trained model has, so that row independence is testable. (Much more saturates the
    probabilities at 1.0, which makes ties again.)"""
    m = TwoTower(ModelConfig.tiny(), seed=1).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(8)
        m.context_lm_head.weight.mul_(8)
    return m


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 256) for _ in range(rng.randint(1, 14))] for _ in range(n)]


def run_engine(m, rows, params, max_batch_rows=4, eos=EOS, ids=None):
    ids = ids or [str(i) for i in range(len(rows))]
    reqs = [Request(i, r, p) for i, r, p in zip(ids, rows, params)]
    out = {r.id: r for r in Engine(m, max_batch_rows=max_batch_rows, eos_ids=eos).run(reqs)}
    assert sorted(out) == sorted(ids)  # every row exactly once
    return [out[i] for i in ids]


def alone(m, row, p, i, eos=EOS):
    return REF[p.mode](m, [row], [p], [row_key(str(i))], eos)[0]


@pytest.mark.parametrize("mode", ["ar", "mock-ar", "diffusion"])
def test_streamlined_equals_reference_batch1(model, mode):
    for i, row in enumerate(prompts(3, seed=7)):
        p = DecodeParams(mode=mode, max_new_tokens=35, gamma=0.5)
        (res,) = run_engine(model, [row], [p], max_batch_rows=1)
        expect = alone(model, row, p, 0)
        assert res.tokens == expect[0], (mode, i)
        assert res.stats.finish_reason == expect[1]
        if mode == "diffusion":  # the engine stops a row once its output is decided
            early = ref.generate_mask_diffusion(model, [row], [p], [row_key("0")], EOS, early_exit=True)[0]
            assert early[:2] == expect[:2] and res.stats.denoiser_steps == early[2] <= expect[2]


def test_early_exit_keeps_tokens_and_saves_steps(peaked):
    """Stopping a row once every position up to its EOS (or its limit) is committed changes no
    token; the denoiser steps the released loop spends on the cut-off rest are saved."""
    saved = 0
    for i, row in enumerate(prompts(12, seed=21)):
        p = DecodeParams(mode="diffusion", gamma=0.6, max_new_tokens=13 + i, block_size=8, steps_per_block=8)
        eos = {row[0]}  # an id this model does emit now and then
        full = ref.generate_mask_diffusion(peaked, [row], [p], [row_key(str(i))], eos)[0]
        early = ref.generate_mask_diffusion(peaked, [row], [p], [row_key(str(i))], eos, early_exit=True)[0]
        (res,) = run_engine(peaked, [row], [p], max_batch_rows=1, eos=eos, ids=[str(i)])
        assert early[:2] == full[:2] and res.tokens == full[0]
        assert res.stats.denoiser_steps == early[2] <= full[2]
        saved += full[2] - early[2]
    assert saved > 0


def test_mixed_batch_rows_equal_alone(peaked):
    """Different prompt lengths, modes, γ and limits; rows finish at different times; slots refill."""
    rows = prompts(9, seed=3)
    modes = ["diffusion", "diffusion", "ar", "mock-ar"]
    params = [
        DecodeParams(mode=modes[i % 4], gamma=[0.3, 0.6, 0.9, 1.0][i % 4], max_new_tokens=5 + 6 * (i % 4), seed=i)
        for i in range(len(rows))
    ]
    results = run_engine(peaked, rows, params, max_batch_rows=4)
    for i, (row, p, res) in enumerate(zip(rows, params, results)):
        expect = alone(peaked, row, p, i)
        assert res.tokens == expect[0], i
        assert res.stats.completion_tokens == len(expect[0])
        assert res.stats.mode == p.mode and res.stats.gamma == p.gamma


def test_sampling_reproducible_and_batch_independent(peaked):
    rows = prompts(6, seed=11)
    params = [DecodeParams(mode=["diffusion", "ar", "mock-ar"][i % 3], temperature=1.0, seed=3, max_new_tokens=12)
              for i in range(len(rows))]
    a = [r.tokens for r in run_engine(peaked, rows, params, max_batch_rows=6)]
    b = [r.tokens for r in run_engine(peaked, rows, params, max_batch_rows=6)]
    c = [r.tokens for r in run_engine(peaked, rows, params, max_batch_rows=2)]
    d = [run_engine(peaked, [row], [p], max_batch_rows=1, ids=[str(i)])[0].tokens
         for i, (row, p) in enumerate(zip(rows, params))]
    assert a == b == c == d
    for i, (row, p) in enumerate(zip(rows, params)):
        assert a[i] == alone(peaked, row, p, i)[0]
    other = [r.tokens for r in run_engine(peaked, rows, [p.replace(seed=4) for p in params], max_batch_rows=6)]
    assert other != a  # the seed matters
    greedy = [r.tokens for r in run_engine(peaked, rows, [p.replace(temperature=0.0) for p in params])]
    assert greedy != a  # sampling at temperature 1 is not greedy


def test_gamma_one_commits_one_token_per_step(model):
    p = DecodeParams(mode="diffusion", gamma=1.0, block_size=8, steps_per_block=8, max_new_tokens=16)
    (res,) = run_engine(model, [[5, 6, 7]], [p], eos=set())
    assert res.stats.denoiser_steps == 16 and res.stats.blocks == 2
    assert res.stats.tokens_per_step == 1.0


def test_last_step_commits_the_rest():
    conf = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    masked = torch.tensor([[True, True, False, True, True]])
    one = lambda k, T, g=0.99: commit_mask(conf, masked, torch.tensor([g]), torch.tensor([k]), torch.tensor([T]))  # noqa: E731
    assert one(3, 4).tolist() == masked.tolist()  # k == T-1: everything still masked
    assert one(0, 4).sum() == 1  # ceil(4 / 4) = 1
    assert one(0, 2).sum() == 2  # ceil(4 / 2) = 2
    assert one(0, 4, g=0.15).sum() == 3  # 0.2, 0.4, 0.5 are over γ among the masked
    assert one(0, 4, g=0.15)[0].tolist() == [False, True, False, True, True]


def test_commit_ties_go_to_higher_position():
    """The release ranks with a stable ascending sort and re-masks the lowest: on an exact tie the
    higher position is committed."""
    conf = torch.full((1, 6), 0.5)
    masked = torch.tensor([[True, True, True, True, True, False]])
    take = commit_mask(conf, masked, torch.tensor([0.9]), torch.tensor([0]), torch.tensor([3]))
    assert take[0].tolist() == [False, False, False, True, True, False]  # ceil(5/3) = 2
    conf[0, 1] = 0.6  # a strictly higher confidence still wins over the tie
    take = commit_mask(conf, masked, torch.tensor([0.9]), torch.tensor([0]), torch.tensor([3]))
    assert take[0].tolist() == [False, True, False, False, True, False]


def test_commit_rule_matches_plain_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        S, T = 12, int(torch.randint(1, 13, (1,), generator=g))
        k = int(torch.randint(0, T, (1,), generator=g))
        conf = torch.rand(1, S, generator=g).round(decimals=1)  # frequent exact ties
        masked = torch.rand(1, S, generator=g) < 0.7
        gamma = float(torch.rand(1, generator=g))
        take = commit_mask(conf, masked, torch.tensor([gamma]), torch.tensor([k]), torch.tensor([T]))[0]
        idx = [j for j in range(S) if masked[0, j]]
        n = len(idx)
        c = n if k == T - 1 else min(max(max(sum(conf[0, j] > gamma for j in idx), 1), math.ceil(n / (T - k))), n)
        chosen = sorted(idx, key=lambda j: (-float(conf[0, j]), -j))[:c]
        assert [j for j in range(S) if take[j]] == sorted(chosen)


def test_commit_count_threshold_rule():
    """How many positions a step commits: at least one, all over γ, at least ceil(n / (T - k)),
    everything at the last step (rows: n masked of 16, `over` of them over γ)."""
    n, over = [16, 16, 5, 3], [0, 9, 0, 3]
    masked = torch.tensor([[j < m for j in range(16)] for m in n])
    conf = torch.tensor([[0.95 if j < o else 0.1 for j in range(16)] for o in over])

    def counts(k):
        B = len(n)
        take = commit_mask(conf, masked, torch.full((B,), 0.9), torch.full((B,), k), torch.full((B,), 16))
        assert not (take & ~masked).any()
        return take.sum(1).tolist()

    assert counts(0) == [1, 9, 1, 3]
    assert counts(14) == [8, 9, 3, 3]  # ceil(n / 2)
    assert counts(15) == [16, 16, 5, 3]  # the rest


def test_mask_id_never_proposed(peaked):
    """The engine excludes the mask id from the denoiser's proposals: with the mask id's logit
    raised far above every other, a diffusion row decodes the same tokens as without (and never
    the mask id). Were the mask proposable it would be committed and stay masked, so the block
    would never complete: a step budget turns that into a failure instead of a hang."""
    rows = prompts(3, seed=13)
    params = [DecodeParams(mode="diffusion", gamma=0.7, max_new_tokens=12, block_size=4, steps_per_block=4,
                           temperature=t, seed=1) for t in (0.0, 1.0, 0.0)]
    plain = run_engine(peaked, rows, params)
    original = peaked.denoise

    def mask_first(*a, **k):
        logits = original(*a, **k)
        logits[..., params[0].mask_token_id] += 1e4
        return logits

    peaked.denoise = mask_first
    try:
        steps = iter(range(200))
        reqs = [Request(str(i), r, p) for i, (r, p) in enumerate(zip(rows, params))]
        engine = Engine(peaked, max_batch_rows=4, eos_ids=EOS)
        out = {r.id: r for r in engine.run(reqs, stop=lambda: next(steps) >= 199)}
    finally:
        del peaked.denoise
    assert sorted(out) == ["0", "1", "2"], "rows did not finish: the mask id was proposed"
    assert [out[str(i)].tokens for i in range(3)] == [r.tokens for r in plain]
    assert all(params[0].mask_token_id not in r.tokens for r in plain)


def test_eos_cut_and_partial_last_block(model):
    row = [9, 8, 7, 6]
    p = DecodeParams(mode="diffusion", gamma=0.5, max_new_tokens=21)
    (res,) = run_engine(model, [row], [p], eos=set())
    assert len(res.tokens) == 21 and res.stats.blocks == 2 and res.stats.finish_reason == "length"
    assert 21 <= res.stats.decoded_tokens <= 32  # the last block ends once its first 5 are committed
    eos_tok = res.tokens[6]
    first = res.tokens.index(eos_tok)
    (cut,) = run_engine(model, [row], [p], eos={eos_tok})
    assert cut.tokens == res.tokens[: first + 1] and cut.stats.finish_reason == "eos"
    assert cut.tokens == alone(model, row, p, 0, eos={eos_tok})[0]


def test_ar_modes_stop_at_limit_and_eos(model):
    for mode in ("ar", "mock-ar"):
        p = DecodeParams(mode=mode, max_new_tokens=9)
        (res,) = run_engine(model, [[4, 5]], [p], eos=set())
        assert len(res.tokens) == 9 and res.stats.finish_reason == "length"
        (cut,) = run_engine(model, [[4, 5]], [p], eos={res.tokens[3]})
        assert cut.tokens[-1] == res.tokens[3] and cut.stats.finish_reason == "eos"


def test_release_api_returns_prompt_plus_completion(model):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = model.generate_mask_diffusion(ids, max_new_tokens=10, eos_token_id=None)
    assert out.shape == (2, 14) and torch.equal(out[:, :4], ids)
    assert [s.completion_tokens for s in model.last_stats] == [10, 10]  # None: no early stop
    ar = model.generate_ar([[5, 6, 7]], max_new_tokens=4)
    assert ar[0][:3] == [5, 6, 7] and len(ar[0]) == 7
    mock = model.generate_mock_ar([[5]], max_new_tokens=3)
    assert mock[0][0] == 5 and len(mock[0]) == 4
    spec = model.generate_speculative([[5, 6, 7]], max_new_tokens=9, block_size=4, steps_per_block=4)
    assert spec == model.generate_ar([[5, 6, 7]], max_new_tokens=9)


def test_release_api_eos_none_never_stops_and_defaults(model):
    """As the release: eos_token_id=None means no early stop (not the config's EOS), and the
    generate_* methods default confidence_threshold to 0.9."""
    import inspect

    row = [9, 8, 7, 6]
    full = model.generate_ar([row], max_new_tokens=12)[0][4:]
    stop = full[3]  # a token this row emits: as an EOS it ends the row there
    cut = full[: full.index(stop) + 1]
    assert model.generate_ar([row], max_new_tokens=12, eos_token_id=stop)[0][4:] == cut
    assert model.generate_ar([row], max_new_tokens=12, eos_token_id=[stop, 10**6])[0][4:] == cut
    assert len(model.generate_ar([row], max_new_tokens=12, eos_token_id=None)[0]) == 16
    for name in ("generate_mask_diffusion", "generate_speculative"):
        assert inspect.signature(getattr(model, name)).parameters["confidence_threshold"].default == 0.9
    d = model.generate_mask_diffusion([row], max_new_tokens=8, block_size=4, steps_per_block=4)
    p = DecodeParams(mode="diffusion", gamma=0.9, block_size=4, steps_per_block=4, max_new_tokens=8)
    assert d[0][4:] == ref.generate_mask_diffusion(model, [row], [p], [row_key("0")], set())[0][0]


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match="empty prompt"):
        list(Engine(model).run([Request("x", [])]))
    with pytest.raises(ValueError, match="vocabulary"):
        list(Engine(model).run([Request("x", [100000])]))


@pytest.mark.parametrize("overlap,mirror", [(True, False), (False, True), (True, True)])
def test_two_device_bookkeeping_gives_identical_tokens(peaked, overlap, mirror):
    """The two-device pipeline on CPU: a denoiser-side mirror updated incrementally after each
    commit, and context commits run in a worker thread while the denoiser steps the other rows."""
    rows = prompts(10, seed=5)
    params = [DecodeParams(mode=["diffusion", "diffusion", "mock-ar", "ar"][i % 4], gamma=0.5 + 0.05 * i,
                           max_new_tokens=6 + 5 * (i % 4), temperature=[0.0, 1.0][i % 2], seed=i)
              for i in range(len(rows))]
    ids = [str(i) for i in range(len(rows))]

    def go(**kw):
        reqs = [Request(i, r, p) for i, r, p in zip(ids, rows, params)]
        out = {r.id: r for r in Engine(peaked, max_batch_rows=3, eos_ids=EOS, **kw).run(reqs)}
        return [out[i] for i in ids]

    plain = go(overlap=False, mirror=False)
    other = go(overlap=overlap, mirror=mirror)
    assert [r.tokens for r in other] == [r.tokens for r in plain]
    keys = ("denoiser_steps", "context_forwards", "blocks", "finish_reason")
    assert [[getattr(r.stats, k) for k in keys] for r in other] == [[getattr(r.stats, k) for k in keys] for r in plain]
