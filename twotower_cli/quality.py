"""A per-row degeneracy signal: `repetition`, the share of a completion covered by its most repeated
n-gram. Plain numpy, no model: it is computed from the completion's token ids.

Definition (README, "Output columns"). Let t_1 .. t_L be the completion's tokens as written (after
the EOS, stop-string and length cuts; the EOS itself excluded). For an n-gram g (2 <= n <= 64)
that occurs at least twice, its coverage is the number of positions i in 1..L inside at least one
of its occurrences (occurrences may overlap: "a a a" holds "a a" twice, covering 3 positions).
`repetition` = max over such g of coverage(g) / L, and 0.0 when no n-gram of length >= 2 occurs
twice (and for completions shorter than 3 tokens).

So a row looping on one phrase scores close to 1 ("the the the ...": the 2-gram "the the" covers
everything; a 20-token sentence said 5 times: the 20-gram covers everything), ordinary prose scores
low (a few repeated bigrams such as "of the": typically < 0.1), and a completion that starts well
and then loops scores the looping share. n-grams longer than 64 tokens are not considered: a cycle
longer than 64 tokens still scores about 64 / cycle length at least.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_N = 64


def repetition(tokens: Sequence[int]) -> float:
    """The share of `tokens` covered by their most repeated n-gram (see the module docstring)."""
    L = len(tokens)
    if L < 3:
        return 0.0
    a = np.asarray(tokens, dtype=np.int64)
    _, ids = np.unique(a, return_inverse=True)  # dense ids of the 1-grams at each start position
    ids = ids.astype(np.int64)
    lo, base = int(a.min()), int(a.max() - a.min()) + 1
    best = 0
    for n in range(2, min(MAX_N, L - 1) + 1):
        m = L - n + 1  # start positions of n-grams
        # the n-gram at i is (the (n-1)-gram at i, token i+n-1): dense ids again, exactly
        key = ids[:m] * base + (a[n - 1:] - lo)
        _, ids, counts = np.unique(key, return_inverse=True, return_counts=True)
        ids = ids.astype(np.int64)
        if counts.max() < 2:
            break  # no n-gram repeats, so no longer one does
        best = max(best, _best_coverage(ids, counts, n))
    return best / L


def _best_coverage(ids: np.ndarray, counts: np.ndarray, n: int) -> int:
    """The largest coverage of an n-gram occurring at least twice; ids[i] is the n-gram at start i."""
    order = np.argsort(ids, kind="stable")  # starts grouped by n-gram, ascending within a group
    g = ids[order]
    gaps = np.diff(order)
    same = g[1:] == g[:-1]
    # an occurrence adds n positions, less its overlap with the previous occurrence of the same n-gram
    add = np.where(same, np.minimum(gaps, n), n)
    cover = np.zeros(len(counts), dtype=np.int64)
    np.add.at(cover, g[1:], add)
    cover[g[0]] += n
    cover[counts < 2] = 0
    return int(cover.max())
