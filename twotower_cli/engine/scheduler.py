"""Policy only: which rows are admitted together, which commit and which denoise this step.

No tensors and no forwards here (those are the runner's). The scheduler reads the request stream
in the batcher's length order and decides:

    admission  the next rows to prefill together: as many as there are free slots, within the
               padded-token budget of one batched prefill, and closed early when the next row
               would push the padding past `max_padding` (rows arrive length-sorted, so this rarely
               splits a batch; it stops a short row and a long one from sharing a prefill)
    commit     rows in Phase.COMMIT: the context tower must read what they committed (or, for a
               speculative row, verify its draft), grouped by what can share one forward
    denoise    rows in Phase.DENOISE, grouped by what can share one denoiser forward
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from .request import Request
from .row import Phase, Row


class Scheduler:
    def __init__(self, requests: Iterable[Request], *, max_batch_tokens: int, max_padding: float,
                 check: Callable[[Request], None] = lambda r: None):
        self.source: Iterator[Request] = iter(requests)
        self.max_batch_tokens = max_batch_tokens  # padded tokens in one batched prefill
        self.max_padding = max_padding  # largest share of padding in one batched prefill
        self.check = check  # raises for a request the model cannot decode
        self.held: Request | None = None  # pulled from the stream but not admitted (token budget)
        self.exhausted = False

    @property
    def drained(self) -> bool:
        """Every request was admitted."""
        return self.exhausted and self.held is None

    def admit(self, free: int) -> list[Request]:
        """The next rows to prefill together (at most `free`; empty when the stream is drained)."""
        new: list[Request] = []
        longest = real = 0
        while len(new) < free:
            if self.held is None:
                self.held = next(self.source, None)
                if self.held is None:
                    self.exhausted = True
                    break
                self.check(self.held)
            L = len(self.held.prompt_ids)
            n = max(longest, L)
            padded = n * (len(new) + 1)
            if new and (padded > self.max_batch_tokens or 1 - (real + L) / padded > self.max_padding):
                break  # keep it for the next prefill
            new.append(self.held)
            longest, real, self.held = n, real + L, None
        return new

    @staticmethod
    def committing(rows: list[Row]) -> list[Row]:
        """Rows the context tower reads for: commits and verifies."""
        return [r for r in rows if r.phase is Phase.COMMIT]

    @staticmethod
    def scoring(rows: list[Row]) -> list[Row]:
        """Decided rows whose AR score needs one more context read."""
        return [r for r in rows if r.phase is Phase.SCORE]

    @staticmethod
    def denoising(rows: list[Row]) -> dict[tuple, list[Row]]:
        """Rows that take a denoiser step, by forward: ("block", S, mask id) for diffusion blocks
        and speculative drafts (the same forward and commit rule), ("mock-ar",)."""
        groups: dict[tuple, list[Row]] = {}
        for r in rows:
            if r.phase is Phase.DENOISE:
                p = r.p
                key = ("mock-ar",) if p.mode == "mock-ar" else ("block", p.block_size, p.mask_token_id)
                groups.setdefault(key, []).append(r)
        return groups

    @staticmethod
    def by_commit(rows: list[Row]) -> dict[tuple[str, int], list[Row]]:
        """Committing rows by forward, in slot order: ("read", n) the context tower reads n tokens
        of each row (a decided row's final read for the AR score takes at most n); ("verify", S)
        it reads speculative drafts with logits at every position."""
        groups: dict[tuple[str, int], list[Row]] = {}
        for r in rows:  # a decided row's final scoring read joins the reads of its width (fewer tokens)
            kind = "verify" if r.p.mode == "speculative" and r.phase is Phase.COMMIT else "read"
            groups.setdefault((kind, r.commit_width), []).append(r)
        return {key: sorted(g, key=lambda r: r.slot) for key, g in groups.items()}
