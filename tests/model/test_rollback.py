"""Rolling the context state back to a prefix of a block, without a second forward (speculative
verify): equal to a fresh forward over the kept tokens, every layer, for every kept length."""

from __future__ import annotations

import pytest
import torch
from model_helpers import rand_ids, random_model

from twotower_cli.model.twotower import ssd_state
from twotower_kernels.ssd import ssd_ref


def assert_same_state(a, b, atol=1e-5):
    assert torch.equal(a.lengths, b.lengths)
    for i in b.conv:
        torch.testing.assert_close(a.conv[i], b.conv[i], atol=atol, rtol=atol)
        torch.testing.assert_close(a.ssm[i], b.ssm[i], atol=atol, rtol=atol)
    for i in b.k:
        for row, n in enumerate(b.lengths.tolist()):  # K/V past a row's length are garbage by design
            torch.testing.assert_close(a.k[i][row, :, :n], b.k[i][row, :, :n], atol=atol, rtol=atol)
            torch.testing.assert_close(a.v[i][row, :, :n], b.v[i][row, :, :n], atol=atol, rtol=atol)


@pytest.mark.parametrize("m", [1, 2, 5, 7, 8])
def test_rollback_equals_a_forward_of_the_kept_tokens(m):
    model = random_model(seed=3)
    V, S = model.config.vocab_size, 8
    prompts = [rand_ids((n,), V, seed=n).tolist() for n in (5, 2, 9)]
    block = rand_ids((3, S), V, seed=11)
    keep_m = torch.tensor([m, S, max(1, m - 1)])  # rows keep different prefixes
    with torch.no_grad():
        state, _ = model.prefill(prompts)
        start, kept = state.lengths.clone(), {}
        model.context_extend(block, state, keep=kept)
        model.context_rollback(state, kept, start, keep_m)
        fresh, _ = model.prefill([p + block[b, : keep_m[b]].tolist() for b, p in enumerate(prompts)])
        assert_same_state(state, fresh)
        # and reading on from the rolled-back state gives what reading on from the fresh one gives
        nxt = rand_ids((3, 3), V, seed=12)
        a = model.context_extend(nxt, state, logits="all")
        b = model.context_extend(nxt, fresh, logits="all")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ssd_state_with_dt_zeroed_is_the_prefix_state():
    g = torch.Generator().manual_seed(0)
    B, n, G, rep, P, N = 2, 6, 2, 2, 4, 3
    nh = G * rep
    x = torch.randn(B, n, nh, P, generator=g)
    dt = torch.rand(B, n, nh, generator=g)
    A = -torch.rand(nh, generator=g)
    Bg = torch.randn(B, n, G, N, generator=g)
    state = torch.randn(B, nh, P, N, generator=g)
    for m in range(1, n + 1):
        live = (torch.arange(n) < m)[None, :, None]
        got = ssd_state(x, dt * live, A, Bg, state)
        Bh = Bg.repeat_interleave(rep, dim=2)
        _, want = ssd_ref(x[:, :m], dt[:, :m], A, Bh[:, :m], Bh[:, :m], state)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
