"""The repetition score (twotower_cli.quality) against hand-made completions and a brute-force twin."""

from __future__ import annotations

import random

import pytest

from twotower_cli.quality import MAX_N, repetition


def brute(tokens: list[int]) -> float:
    """The definition, literally: every n-gram (2 <= n <= MAX_N) occurring twice, its covered positions."""
    L = len(tokens)
    if L < 3:
        return 0.0
    best = 0
    for n in range(2, min(MAX_N, L - 1) + 1):
        starts: dict[tuple[int, ...], list[int]] = {}
        for i in range(L - n + 1):
            starts.setdefault(tuple(tokens[i:i + n]), []).append(i)
        for occ in starts.values():
            if len(occ) >= 2:
                best = max(best, len({p for s in occ for p in range(s, s + n)}))
    return best / L


@pytest.mark.parametrize("tokens, expected", [
    ([], 0.0),
    ([7, 7], 0.0),  # too short: a 2-gram cannot occur twice
    ([7, 7, 7], 1.0),  # "a a" twice, overlapping: every position
    ([1, 2, 3, 4, 5, 6], 0.0),  # nothing repeats
    ([1, 2, 1, 2, 1, 2], 1.0),  # a 2-token loop
    ([5, 6, 7, 1, 2, 1, 2], 4 / 7),  # starts well, then loops
    ([1, 2, 9, 1, 2, 8], 4 / 6),  # one bigram twice, apart
    (list(range(20)) * 5, 1.0),  # a 20-token sentence said five times
])
def test_hand_made(tokens, expected):
    assert repetition(tokens) == pytest.approx(expected)


def test_matches_the_definition_on_random_completions():
    rng = random.Random(0)
    for _ in range(200):
        L = rng.randrange(0, 40)
        vocab = rng.choice([2, 3, 5, 50])
        tokens = [rng.randrange(vocab) for _ in range(L)]
        if rng.random() < 0.3 and L > 4:  # splice in a loop
            cyc = tokens[: rng.randrange(1, 5)]
            tokens = tokens + cyc * rng.randrange(2, 6)
        assert repetition(tokens) == pytest.approx(brute(tokens)), tokens


def test_prose_scores_low_and_loops_high():
    rng = random.Random(1)
    prose = [rng.randrange(5000) for _ in range(300)]
    assert repetition(prose) < 0.05
    assert repetition(prose[:100] + [11, 12, 13] * 70) > 0.6
