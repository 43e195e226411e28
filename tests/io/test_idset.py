"""The reader's compact seen-id set against a plain Python set (its slow obvious twin)."""

from __future__ import annotations

import random

from twotower_cli.io import idset
from twotower_cli.io.idset import IdSet


def test_idset_agrees_with_a_set_across_merges(monkeypatch):
    monkeypatch.setattr(idset, "_MIN_RECENT", 64)  # many merges on a small input
    rng = random.Random(0)
    pool = [f"id-{i}" for i in range(3000)] + ["", "é", "\udc80x", "a\x01b"]
    s, plain = IdSet(), set()
    for _ in range(6000):
        x = rng.choice(pool)
        assert s.add(x) == (x not in plain), x
        plain.add(x)
        y = rng.choice(pool)
        assert (y in s) == (y in plain)
    assert len(s) == len(plain) and s.nbytes >= 16 * (len(plain) - 64 * 8)


def test_idset_is_compact():
    s = IdSet()
    for i in range(200_000):
        s.add(str(i))
    assert len(s) == 200_000 and s.nbytes <= 16 * 200_000
