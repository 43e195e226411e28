"""Stop strings in the engine: matched on decoded text across token and block boundaries, the row
cut after the token that completes one (finish_reason "stop"), and no step spent after it."""

from __future__ import annotations

import random

import pytest
from model_helpers import peaked_model

from twotower_cli.config import DecodeParams
from twotower_cli.engine import Engine, Request
from twotower_cli.engine.stops import StopMatcher, cut_at_stop

EOS = {2}


def piece(t: int) -> str:
    """A fake detokenizer: every token is two characters, so a 2-character stop string made of the
    second half of one token and the first half of the next lies across a token boundary."""
    return chr(0x61 + t % 26) + chr(0x41 + (t // 26) % 26)


def detok(ids: list[int]) -> str:
    return "".join(piece(t) for t in ids)


@pytest.fixture(scope="module")
def peaked():
    return peaked_model(seed=5)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 256) for _ in range(rng.randint(2, 10))] for _ in range(n)]


def run(model, rows, params, stops=None, max_batch_rows=4):
    reqs = [Request(str(i), r, p, stop=StopMatcher(stops[i], detok) if stops and stops[i] else None)
            for i, (r, p) in enumerate(zip(rows, params))]
    out = {r.id: r for r in Engine(model, max_batch_rows=max_batch_rows, eos_ids=EOS).run(reqs)}
    return [out[str(i)] for i in range(len(rows))]


def across(tokens: list[int], j: int) -> str:
    """A stop string that starts inside token j-1 and ends inside token j."""
    return piece(tokens[j - 1])[1] + piece(tokens[j])[0]


def expected_cut(tokens: list[int], stop: str) -> int:
    """The fewest leading tokens whose text holds the stop string (the direct computation)."""
    return next(j for j in range(1, len(tokens) + 1) if stop in detok(tokens[:j]))


def test_matcher_finds_a_stop_split_across_tokens():
    toks = [3, 30, 7, 55, 9, 12]
    stop = across(toks, 3)
    m = StopMatcher([stop], detok)
    assert m.find(toks[:3], 0) is None  # not complete yet
    assert m.find(toks, 3) == expected_cut(toks, stop) == 4
    assert StopMatcher(["zz-not-there"], detok).find(toks, 0) is None


def test_matcher_window_sees_a_stop_that_began_before_the_new_tokens():
    toks = list(range(40, 80))
    stop = detok(toks[20:23])  # six characters over three tokens; the last token arrives alone
    m = StopMatcher([stop], detok)
    assert m.find(toks[:22], 0) is None
    assert m.find(toks[:23], 22) == 23


def test_cut_at_stop_drops_the_stop_string_and_takes_the_first():
    assert cut_at_stop("hello world. bye", [".", "bye"]) == ("hello world", True)
    assert cut_at_stop("hello", ["x"]) == ("hello", False)


@pytest.mark.parametrize("mode,S", [("ar", 4), ("mock-ar", 4), ("diffusion", 4), ("diffusion", 8), ("speculative", 4)])
def test_engine_cuts_at_the_stop_and_stops_early(peaked, mode, S):
    rows = prompts(4, seed=1)
    params = [DecodeParams(mode=mode, gamma=0.6, block_size=S, steps_per_block=S, max_new_tokens=40, temperature=0.0)
              for _ in rows]
    free = run(peaked, rows, params)
    stops, want = [], []
    for i, r in enumerate(free):
        toks = r.tokens
        if r.stats.finish_reason != "length" or len(toks) < 12:
            stops.append(None)
            want.append(None)
            continue
        j = S + 1 if i % 2 == 0 else 9  # even rows: across the first block boundary (tokens S-1, S)
        stop = across(toks, j)
        stops.append([stop, "no-such-stop"])
        want.append(expected_cut(toks, stop))
    assert any(w is not None for w in want)
    cut = run(peaked, rows, params, stops)
    for r0, r1, w in zip(free, cut, want):
        if w is None:
            assert r1.tokens == r0.tokens
            continue
        assert r1.tokens == r0.tokens[:w]
        assert r1.stats.finish_reason == "stop" and r1.stats.completion_tokens == w
        assert r1.stats.steps < r0.stats.steps  # no step spent on what the stop cut off


def test_diffusion_row_stops_mid_block(peaked):
    """A stop completed by a block's committed prefix ends the row before the block completes."""
    row = prompts(1, seed=3)
    p = DecodeParams(mode="diffusion", gamma=0.99, block_size=16, steps_per_block=16, max_new_tokens=16)
    (free,) = run(peaked, row, [p])
    toks = free.tokens
    assert len(toks) == 16
    stop = across(toks, 2)
    (cut,) = run(peaked, row, [p], [[stop]])
    assert cut.tokens == toks[: expected_cut(toks, stop)]
    assert cut.stats.finish_reason == "stop"
    assert cut.stats.denoiser_steps < free.stats.denoiser_steps


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_speculative_with_stops_equals_ar(peaked, temperature):
    rows = prompts(6, seed=7)
    base = [DecodeParams(mode="ar", max_new_tokens=30, temperature=temperature, seed=3) for _ in rows]
    free = run(peaked, rows, base)
    stops = [[across(r.tokens, 5 + i)] if len(r.tokens) > 12 else None for i, r in enumerate(free)]
    ar = run(peaked, rows, base, stops)
    spec = run(peaked, rows, [p.replace(mode="speculative", block_size=6, steps_per_block=6, gamma=0.5) for p in base],
               stops)
    for a, s in zip(ar, spec):
        assert s.tokens == a.tokens and s.stats.finish_reason == a.stats.finish_reason


def test_stop_rows_beside_rows_without_stops_are_unchanged(peaked):
    rows = prompts(6, seed=9)
    params = [DecodeParams(mode="diffusion", gamma=0.7, block_size=4, steps_per_block=4, max_new_tokens=24)
              for _ in rows]
    free = run(peaked, rows, params)
    stops = [[across(r.tokens, 6)] if i % 2 and len(r.tokens) > 8 else None for i, r in enumerate(free)]
    mixed = run(peaked, rows, params, stops)
    for i, (a, b) in enumerate(zip(free, mixed)):
        if stops[i] is None:
            assert b.tokens == a.tokens and b.stats == a.stats.__class__(**{**a.stats.__dict__,
                                                                            "latency_s": b.stats.latency_s})
