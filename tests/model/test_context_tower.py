"""Context tower: incremental reading (prefill, +1, +S, ragged rows) == one full forward;
TowerState select / assign / concat round trips."""

from __future__ import annotations

import pytest
import torch
from model_helpers import rand_ids, random_model

from twotower_cli.model.twotower import TowerState

TOL = dict(atol=1e-4, rtol=1e-4)


def padded(chunks: list[torch.Tensor], seed: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows of different lengths with random (garbage) tokens; return ids, n_valid."""
    n = max(max(len(c) for c in chunks), 1)
    ids = rand_ids((len(chunks), n), vocab, seed)
    for b, c in enumerate(chunks):
        ids[b, : len(c)] = c
    return ids, torch.tensor([len(c) for c in chunks])


# Per row, how many tokens each call reads: a ragged prefill (9 > chunk_size 8), +1, +S ragged, +1.
STEPS = [[5, 9, 2], [1, 1, 1], [4, 2, 3], [1, 1, 1]]


@pytest.fixture(scope="module")
def model():
    return random_model(seed=11, ar_only=True)


def reference_logits(model, seqs):
    with torch.no_grad():
        return [model.context_logits(s[None])[0] for s in seqs]  # each row alone, no padding


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_incremental_equals_full_forward_ragged(model, scan):
    V = model.config.vocab_size
    totals = [sum(step[b] for step in STEPS) for b in range(3)]
    seqs = [rand_ids((t,), V, seed=20 + b) for b, t in enumerate(totals)]
    ref = reference_logits(model, seqs)
    state = model.new_state(3)
    offset = [0, 0, 0]
    with torch.no_grad():
        for k, step in enumerate(STEPS):
            chunks = [seqs[b][offset[b] : offset[b] + n] for b, n in enumerate(step)]
            ids, n_valid = padded(chunks, seed=100 + k, vocab=V)
            h = model.context_tower.extend(ids, state, n_valid, scan)
            logits = model.context_lm_head(h).float()
            for b, n in enumerate(step):
                torch.testing.assert_close(logits[b, :n], ref[b][offset[b] : offset[b] + n], **TOL)
                offset[b] += n
            assert state.lengths.tolist() == offset


def test_context_extend_returns_last_real_token_logits(model):
    V = model.config.vocab_size
    seqs = [rand_ids((n,), V, seed=30 + n) for n in (6, 3)]
    ref = reference_logits(model, seqs)
    ids, n_valid = padded(seqs, seed=31, vocab=V)
    with torch.no_grad():
        last = model.context_extend(ids, model.new_state(2), n_valid, logits=True)
    assert last.shape == (2, V) and last.dtype == torch.float32
    for b, s in enumerate(seqs):
        torch.testing.assert_close(last[b], ref[b][len(s) - 1], **TOL)


def test_extend_uniform_block_without_n_valid(model):
    """Equal-length rows need no n_valid: prefill 7 then a block of S=4 for both rows."""
    ids = rand_ids((2, 11), model.config.vocab_size, seed=40)
    with torch.no_grad():
        ref = model.context_logits(ids)
        state = model.new_state(2)
        model.context_extend(ids[:, :7], state)
        got = model.context_lm_head(model.context_tower.extend(ids[:, 7:], state)).float()
    torch.testing.assert_close(got, ref[:, 7:], **TOL)


def states_equal(a: TowerState, b: TowerState) -> None:
    """Same lengths, conv and SSM states, and the same K/V on each row's valid slots."""
    assert torch.equal(a.lengths, b.lengths)
    for j, (da, db) in enumerate(zip(a.tensors(), b.tensors(), strict=True)):  # k, v, conv, ssm
        assert da.keys() == db.keys()
        for i in da:
            for r in range(a.batch):
                x, y = da[i][r], db[i][r]
                if j < 2:
                    x, y = x[:, : int(a.lengths[r])], y[:, : int(a.lengths[r])]
                assert torch.equal(x, y)


def prefilled(model, lengths, seed):
    V = model.config.vocab_size
    seqs = [rand_ids((n,), V, seed=seed + j) for j, n in enumerate(lengths)]
    ids, n_valid = padded(seqs, seed=seed + 99, vocab=V)
    state = model.new_state(len(lengths))
    with torch.no_grad():
        model.context_extend(ids, state, n_valid)
    return state


def test_towerstate_select_concat_assign_round_trip(model):
    st = prefilled(model, [5, 9, 2], seed=50)
    # select + concat: rows in a new order, then back
    a, b = st.select(torch.tensor([2, 0])), st.select(torch.tensor([1]))
    c = TowerState.concat([a, b])  # rows [2, 0, 1]
    states_equal(c, st.select(torch.tensor([2, 0, 1])))
    back = c.select(torch.tensor([1, 2, 0]))
    states_equal(back, st)
    # assign: write the permuted rows back into a copy of the original, in the original order
    dst = st.select(torch.arange(3))
    dst.assign(torch.tensor([2, 0, 1]), c)
    states_equal(dst, st)
    # select is a copy: changing it leaves the source alone
    a.lengths[0] = 123
    assert st.lengths[2] == 2


def test_concat_of_different_capacities_keeps_decoding(model):
    """States prefilled separately (different K/V capacities) concatenate into a batch whose next
    extension gives each row's own logits; assign into a bigger state grows it."""
    V = model.config.vocab_size
    s1, s2 = prefilled(model, [3], seed=60), prefilled(model, [12, 4], seed=70)
    assert s1.capacity != s2.capacity
    both = TowerState.concat([s1, s2])
    nxt = rand_ids((3, 2), V, seed=80)
    with torch.no_grad():
        got = model.context_lm_head(model.context_tower.extend(nxt, both)).float()
        want1 = model.context_lm_head(model.context_tower.extend(nxt[:1], s1.select(torch.tensor([0])))).float()
        want2 = model.context_lm_head(model.context_tower.extend(nxt[1:], s2.select(torch.tensor([0, 1])))).float()
    torch.testing.assert_close(got, torch.cat([want1, want2]), **TOL)
    # assign the long rows into a state of smaller capacity: it grows to fit
    small = prefilled(model, [2, 3], seed=90)
    small.assign(torch.tensor([0, 1]), s2)
    assert small.capacity >= s2.capacity
    states_equal(small, s2)


def test_one_token_step_alone_equals_in_a_ragged_batch(model):
    """An AR step of a row alone takes the unmasked attention path (every slot is valid); inside a
    batch with a longer row it takes the masked one. Both give the row's logits."""
    V = model.config.vocab_size
    seqs = [rand_ids((n,), V, seed=40 + n) for n in (6, 10)]
    with torch.no_grad():
        both = model.new_state(2)
        ids, n_valid = padded([s[:-1] for s in seqs], seed=41, vocab=V)
        model.context_extend(ids, both, n_valid)
        step_both = model.context_extend(torch.stack([s[-1:] for s in seqs]), both, logits=True)
        for b, s in enumerate(seqs):
            alone = model.new_state(1)
            model.context_extend(s[None, :-1], alone)
            step_alone = model.context_extend(s[None, -1:], alone, logits=True)
            torch.testing.assert_close(step_alone[0], step_both[b], **TOL)
            torch.testing.assert_close(step_alone[0], reference_logits(model, [s])[0][-1], **TOL)
