"""Sampling filters (top_k, top_p, min_p): `sampling_floor` against a brute force over the spec's
words, the floor in `choose`, and the engine (every mode; speculative == AR; rows independent of
their batch; no filter = no extra work)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from model_helpers import peaked_model

import twotower_kernels as kernels
from twotower_cli.config import DecodeParams
from twotower_cli.engine import Engine, Request
from twotower_cli.engine import decode as decode_mod
from twotower_cli.engine.decode import choose
from twotower_kernels.confidence import sampling_floor

EOS = {2}
MASK = 3
INF = float("inf")


# -- sampling_floor vs a brute force ----------------------------------------------------------------


def brute_kept(logits: list[float], T: float, k: int, p: float, m: float) -> set[int]:
    """The ids a token may be sampled from, computed from the spec's words one token at a time
    (python floats; -inf ids are excluded ids, never eligible)."""
    ids = [v for v, x in enumerate(logits) if x > -INF]
    if T <= 0:
        return set(ids)
    s = {v: float(torch.tensor(logits[v]) / torch.tensor(T)) for v in ids}  # logits / T as fp32, as the kernel
    kept = set(ids)
    if 0 < k < len(logits):  # 1. the k-th largest logit, ties at it kept
        kth = sorted((logits[v] for v in ids), reverse=True)[k - 1] if k <= len(ids) else -INF
        kept = {v for v in kept if logits[v] >= kth}
    if p < 1:  # 2. nucleus over the kept tokens, renormalised, most probable first
        top = max(s[v] for v in kept)
        w = {v: math.exp(s[v] - top) for v in kept}
        z = sum(w.values())
        order = sorted(kept, key=lambda v: -logits[v])
        nucleus, before = [], 0.0
        for v in order:
            if before < p:
                nucleus.append(v)
            before += w[v] / z
        low = min(logits[v] for v in nucleus)
        kept = {v for v in kept if logits[v] >= low}  # ties at the floor are kept
    if m > 0:  # 3. at least m times the most likely token's probability
        top = max(s[v] for v in ids)
        z = sum(math.exp(s[v] - top) for v in ids)
        qmax = 1.0 / z
        kept = {v for v in kept if math.exp(s[v] - top) / z >= m * qmax}
    return kept


def floor_kept(logits: torch.Tensor, floor: float) -> set[int]:
    return {v for v, x in enumerate(logits.tolist()) if x > -INF and x >= floor}


def check_rows(logits, temps, ks, ps, ms):
    """sampling_floor over the batch == the brute force per (row, position); each row == alone."""
    B, S, _ = logits.shape
    args = (torch.tensor(temps), torch.tensor(ks), torch.tensor(ps, dtype=torch.float64), torch.tensor(ms))
    floor = sampling_floor(logits, *args)
    assert floor.shape == (B, S) and floor.dtype == torch.float32
    for b in range(B):
        alone = sampling_floor(logits[b : b + 1], *(a[b : b + 1] for a in args))
        assert torch.equal(alone[0], floor[b]), b  # whatever the batch (and its sort width)
        for s in range(S):
            want = brute_kept(logits[b, s].tolist(), temps[b], ks[b], ps[b], ms[b])
            assert floor_kept(logits[b, s], floor[b, s].item()) == want, (b, s, temps[b], ks[b], ps[b], ms[b])
            if temps[b] <= 0 or (ks[b] in (0,) or ks[b] >= logits.shape[-1]) and ps[b] == 1 and ms[b] == 0:
                assert floor[b, s].item() == -INF  # nothing filtered
    return floor


def tied(B, S, V, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 3, (B, S, V), generator=g).float()


def smooth(B, S, V, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, S, V, generator=g)


def test_top_k_with_ties_and_k_at_least_v():
    V = 12
    logits = tied(6, 3, V, seed=1)
    logits[0, 0] = torch.tensor([5.0, 3, 3, 3, 3, 1, 0, 0, -1, -2, -2, -3])  # k = 2 or 3: the 3s all kept
    ks = [2, 3, 1, V, V + 5, 0]
    floor = check_rows(logits, [1.0] * 6, ks, [1.0] * 6, [0.0] * 6)
    assert floor[0, 0].item() == 3.0 and floor[2, 0].item() == logits[2, 0].max().item()
    assert (floor[3:] == -INF).all()  # k >= V, k = 0: no effect
    smooth_l = smooth(4, 3, V, seed=2)
    check_rows(smooth_l, [0.5, 1.0, 2.0, 1.0], [1, 4, 7, 11], [1.0] * 4, [0.0] * 4)


def test_top_p_nucleus_from_sorted_cumulative_sums():
    V = 16
    logits = smooth(5, 4, V, seed=3)
    temps, ps = [1.0, 0.5, 2.0, 1.0, 0.7], [0.9, 0.5, 0.3, 0.99, 0.05]
    floor = check_rows(logits, temps, [0] * 5, ps, [0.0] * 5)
    # spelled out once: the nucleus is the shortest sorted prefix whose mass before its last is < p
    q = torch.softmax(logits[0, 0].double() / 1.0, -1).sort(descending=True).values
    n = int((torch.cumsum(q, 0) - q < 0.9).sum())
    assert floor[0, 0].item() == logits[0, 0].sort(descending=True).values[n - 1].item()
    assert (floor[4] == logits[4].amax(-1)).all()  # p tiny: the top token only
    check_rows(tied(4, 4, V, seed=4), [1.0, 0.6, 1.5, 1.0], [0] * 4, [0.6, 0.8, 0.4, 0.95], [0.0] * 4)


def test_min_p():
    V = 16
    logits = smooth(4, 4, V, seed=5)
    floor = check_rows(logits, [1.0, 0.5, 2.0, 1.0], [0] * 4, [1.0] * 4, [0.05, 0.2, 0.5, 1.0])
    want = logits[1].amax(-1) + 0.5 * math.log(0.2)
    torch.testing.assert_close(floor[1], want)
    check_rows(tied(3, 3, V, seed=6), [1.0, 0.3, 1.0], [0] * 3, [1.0] * 3, [0.1, 0.3, 0.6])


def test_all_three_combined_and_the_top_k_window():
    """Rows with top_p all have top_k: the sort is a top-k window, and ties at the k-th logit
    beyond it still count in the nucleus' mass; a top_p-only row makes the sort full. Same floors."""
    V = 20
    logits = tied(5, 3, V, seed=7)
    logits[0, 0] = torch.tensor([4.0] + [2.0] * 9 + [0.0] + [-1.0] * 9)  # k = 2: nine 2s, the window is 8 wide
    temps, ks, ps = [1.0, 0.8, 1.3, 0.5, 1.0], [2, 5, 3, 8, 4], [0.8, 0.9, 0.7, 0.95, 0.6]
    ms = [0.0, 0.05, 0.1, 0.02, 0.3]
    windowed = check_rows(logits, temps, ks, ps, ms)
    both = torch.cat([logits, smooth(1, 3, V, seed=8)])
    full = check_rows(both, temps + [1.0], ks + [0], ps + [0.5], ms + [0.0])
    assert torch.equal(full[:5], windowed)
    check_rows(smooth(5, 3, V, seed=9), temps, ks, ps, ms)
    assert floor_kept(logits[0, 0], windowed[0, 0].item()) == set(range(10))  # 4 then all nine 2s


def test_excluded_ids_and_temperature_zero():
    V = 10
    logits = smooth(4, 3, V, seed=10)
    logits[..., MASK] = -INF
    logits[0, 0, MASK] = -INF
    # k = V - 1 = the count of finite ids: the k-th largest is the smallest finite one
    temps, ks, ps, ms = [1.0, 1.0, 0.0, 0.0], [V - 1, 3, 2, 0], [0.999999, 0.9, 0.5, 1.0], [0.0, 0.01, 0.5, 0.0]
    floor = check_rows(logits, temps, ks, ps, ms)
    for b in range(4):
        for s in range(3):
            assert MASK not in floor_kept(logits[b, s], floor[b, s].item())
    assert (floor[2:] == -INF).all()  # temperature 0: untouched whatever the filters
    nothing = sampling_floor(logits, torch.ones(4), torch.zeros(4, dtype=torch.long), torch.ones(4), torch.zeros(4))
    assert (nothing == -INF).all()


# -- the floor in choose ------------------------------------------------------------------------------


def row_inputs(B, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(B) + seed, torch.randint(0, 2**62, (B,), generator=g),
            torch.randint(0, 100, (B, 1), generator=g) + torch.arange(S), torch.randint(0, 5, (B,), generator=g))


def filters(ks, ps, ms):
    return torch.tensor(ks), torch.tensor(ps, dtype=torch.float64), torch.tensor(ms)


def test_top_k_one_is_greedy_through_choose():
    logits = smooth(4, 6, 40, seed=11)
    rows = row_inputs(4, 6)
    with kernels.force("ref"):
        greedy = choose(logits, torch.zeros(4), *rows)
        sampled = choose(logits, torch.ones(4), *rows)
        top1 = choose(logits, torch.ones(4), *rows, filters([1] * 4, [1.0] * 4, [0.0] * 4))
        p_tiny = choose(logits, torch.ones(4), *rows, filters([0] * 4, [1e-6] * 4, [0.0] * 4))
    assert not torch.equal(sampled[0], greedy[0])  # sampling does change tokens here
    for got in (top1, p_tiny):
        assert torch.equal(got[0], greedy[0]) and torch.equal(got[1], greedy[1])  # conf: unfiltered


def test_choose_keeps_to_the_floor_and_conf_is_unfiltered():
    """Over many noise draws every sampled token is eligible; conf is softmax(logits)[pred]."""
    B, S, V = 3, 64, 30
    logits = smooth(B, S, V, seed=12, scale=1.0)
    logits[..., MASK] = -INF
    t = torch.tensor([1.0, 0.8, 1.5])
    f = filters([5, 0, 8], [1.0, 0.7, 0.9], [0.0, 0.0, 0.05])
    floor = sampling_floor(logits, t, *f)
    with kernels.force("ref"):
        pred, conf = choose(logits, t, *row_inputs(B, S, seed=3), f)
        free, _ = choose(logits, t, *row_inputs(B, S, seed=3))
    chosen = logits.gather(-1, pred[..., None])[..., 0]
    assert (chosen >= floor).all() and not (pred == MASK).any()
    assert ((free != pred).sum() > 0) and (logits.gather(-1, free[..., None])[..., 0] < floor).any()
    torch.testing.assert_close(conf, torch.softmax(logits, -1).gather(-1, pred[..., None])[..., 0], rtol=0, atol=0)


# -- the engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peaked():
    return peaked_model(seed=5)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 256) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def run(model, rows, params, max_batch_rows=4):
    reqs = [Request(str(i), r, p) for i, (r, p) in enumerate(zip(rows, params))]
    out = {r.id: r for r in Engine(model, max_batch_rows=max_batch_rows, eos_ids=EOS).run(reqs)}
    return [out[str(i)].tokens for i in range(len(rows))]


FILTERS = [dict(top_p=0.9), dict(top_k=5), dict(min_p=0.05), dict(top_k=5, top_p=0.9, min_p=0.05)]


@pytest.mark.parametrize("mode", ["ar", "diffusion", "mock-ar", "speculative"])
def test_top_k_one_at_temperature_one_is_greedy_in_the_engine(peaked, mode):
    rows = prompts(3, seed=1)
    greedy = [DecodeParams(mode=mode, gamma=0.6, block_size=8, steps_per_block=8, max_new_tokens=12, seed=i)
              for i in range(len(rows))]
    top1 = [p.replace(temperature=1.0, top_k=1) for p in greedy]
    sampled = [p.replace(temperature=1.0) for p in greedy]
    want = run(peaked, rows, greedy)
    assert run(peaked, rows, top1) == want
    if mode in ("ar", "diffusion"):
        assert run(peaked, rows, sampled) != want  # sampling does change tokens here


def test_speculative_equals_ar_with_filters(peaked):
    rows = prompts(6, seed=2)
    for f in FILTERS:
        base = [DecodeParams(mode="ar", temperature=0.8, seed=7 + i, max_new_tokens=10 + 3 * i, **f)
                for i in range(len(rows))]
        ar = run(peaked, rows, base, max_batch_rows=3)
        for gamma, S in ((0.5, 8), (0.9, 4)) if len(f) == 3 else ((0.5, 8),):
            spec = [p.replace(mode="speculative", gamma=gamma, block_size=S, steps_per_block=S) for p in base]
            assert run(peaked, rows, spec, max_batch_rows=3) == ar, (f, gamma, S)
            assert run(peaked, rows[:2], spec[:2], max_batch_rows=1) == ar[:2], (f, gamma, S)


def test_rows_with_filters_are_independent_of_their_batch(peaked):
    """Filtered and unfiltered rows of every mode share forwards; each row's tokens are its own
    alone; the filters change sampled outputs (the unfiltered twins differ)."""
    rows = prompts(12, seed=3)
    modes = ["diffusion", "ar", "speculative", "mock-ar"]
    params = []
    for i in range(len(rows)):
        f = FILTERS[i % len(FILTERS)] if i % 3 else {}  # every third row: no filter
        params.append(DecodeParams(mode=modes[i % 4], gamma=0.6, block_size=8, steps_per_block=8,
                                   temperature=[1.0, 0.8, 1.5][i % 3], seed=i, max_new_tokens=9 + i, **f))
    mixed = run(peaked, rows, params, max_batch_rows=4)
    alone = run(peaked, rows, params, max_batch_rows=1)
    assert mixed == alone
    plain = run(peaked, rows, [p.replace(top_k=0, top_p=1.0, min_p=0.0) for p in params], max_batch_rows=4)
    assert sum(a != b for a, b in zip(mixed, plain)) >= 3
    assert all(a == b for a, b, p in zip(mixed, plain, params) if not p.filters)


def test_no_filter_computes_nothing(peaked, monkeypatch):
    """No row with a filter on (none set, or set at temperature 0): `sampling_floor` never runs."""
    def boom(*a, **k):
        raise AssertionError("sampling_floor ran without a filter")

    monkeypatch.setattr(decode_mod, "sampling_floor", boom)
    rows = prompts(4, seed=4)
    params = [DecodeParams(mode=m, block_size=8, steps_per_block=8, max_new_tokens=6, temperature=t, seed=1, **f)
              for m, t, f in (("diffusion", 1.0, {}), ("ar", 0.0, dict(top_k=3)), ("speculative", 0.7, {}),
                              ("mock-ar", 0.0, dict(top_p=0.5, min_p=0.1)))]
    run(peaked, rows, params)
    with pytest.raises(AssertionError, match="without a filter"):
        run(peaked, rows[:1], [params[0].replace(top_k=3)])
