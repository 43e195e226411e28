"""Stop strings: where a row's decoded text first contains one, in tokens (no tensors).

The engine holds token ids, not text; a row with stop strings carries a `StopMatcher` built with
the tokenizer's decode function (the batcher makes it), and the row asks it after every commit of
new tokens. Matching is on decoded text, so a stop string split across tokens (or across a
diffusion block boundary) is found like any other.

Only a window is decoded at each check: the new tokens and enough tokens before them to hold a
stop string that began earlier (`overlap`: 4 bytes per character of the longest stop string, plus
a margin for a multi-byte character cut at the window's start). A match inside the window is a
match in the whole text. The final text is cut by the pipeline on the whole decoded completion
(`cut_at_stop`), which stays the authority: this matcher only decides when a row may stop
spending steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


class StopMatcher:
    def __init__(self, stops: Sequence[str], decode: Decode):
        if not stops:
            raise ValueError("no stop strings")
        self.stops = tuple(stops)
        self.decode = decode
        self.overlap = 4 * max(len(s) for s in self.stops) + 8  # tokens (each holds at least one byte)
        self.checks = 0  # decodes done (tests, benchmarks)

    def _hit(self, tokens: list[int], start: int, end: int) -> bool:
        self.checks += 1
        text = self.decode(tokens[start:end])
        return any(s in text for s in self.stops)

    def find(self, tokens: list[int], new_from: int) -> int | None:
        """`tokens`: a row's output so far, of which `tokens[new_from:]` are new since the last
        call (earlier ones held no stop string). Returns j, the fewest leading tokens whose text
        contains a stop string (the row keeps tokens[:j]), or None."""
        end = len(tokens)
        if end <= new_from:
            return None
        start = max(0, new_from - self.overlap)
        if not self._hit(tokens, start, end):
            return None
        lo, hi = new_from + 1, end  # the smallest j in [lo, hi] with a hit: hit(hi) holds
        while lo < hi:
            mid = (lo + hi) // 2
            if self._hit(tokens, start, mid):
                hi = mid
            else:
                lo = mid + 1
        return lo


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first occurrence of any stop string (the stop string is not kept, as in
    the OpenAI API), and whether one occurred."""
    first = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    return (text, False) if first < 0 else (text[:first], True)
