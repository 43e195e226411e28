"""Block-granular continuous batching: every row is its own state machine (engine.row), and one
engine step is

    schedule  refill free slots: the scheduler picks the next rows, the runner prefills them in
              one batched forward
    commit    one batched context-tower forward per token count for the rows that committed
              something: diffusion rows whose block completed read S tokens, AR / mock-AR rows one,
              speculative rows have their drafted block verified (and rolled back to what AR keeps)
    denoise   one batched denoiser forward per group of rows mid-block (diffusion: then the
              threshold commit rule per row), or choosing their next token (mock-AR)
    score     (with the AR score) one context read of what the rows decided by this denoise left
              unread, so that they too retire in this step
    retire    rows whose output is decided (EOS or their limit) leave at once, freeing their slots

so rows at different blocks, with different prompt lengths and settings, share every forward, and
one slow row never stalls the others. `scheduler.py` decides, `runner.py` owns the tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from ..model.twotower import TwoTower
from .request import Request, Result
from .row import Phase, Row
from .runner import Runner
from .scheduler import Scheduler


class Engine:
    """Decode a stream of `Request`s; `run` yields each `Result` as soon as its row finishes.

    overlap: run context commits concurrently with denoiser steps (default: when the towers are on
    different devices). mirror: keep the denoiser's copy of the context state even on one device
    (tests the two-device bookkeeping without two devices).
    """

    def __init__(self, model: TwoTower, *, max_batch_rows: int = 32, max_batch_tokens: int = 16384,
                 eos_ids: Iterable[int] | None = None, scan: str = "auto", capacity: int = 256,
                 overlap: bool | None = None, mirror: bool | None = None, max_padding: float = 0.05,
                 ar_score: bool | None = None):
        if max_batch_rows < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_rows and max_batch_tokens must be at least 1")
        self.model = model
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = max_padding
        self.eos = set(model.config.eos_ids if eos_ids is None else eos_ids)
        self.scan = scan
        self.capacity = capacity
        self.overlap = overlap
        self.mirror = mirror
        # The AR score (Stats.ar_logprob, ar_agreement): True every row, False none, None the rows
        # where it is free (AR and speculative, whose context logits are computed anyway).
        self.ar_score = ar_score
        # prefill accounting: real prompt tokens vs padded positions computed (padding waste)
        self.counters = {"prefill_calls": 0, "prefill_tokens": 0, "prefill_padded_tokens": 0,
                         "denoiser_calls": 0, "context_calls": 0}

    @torch.no_grad()
    def run(self, requests: Iterable[Request], stop: Callable[[], bool] | None = None) -> Iterator[Result]:
        """`stop()` is asked before every step: True abandons the rows in flight and returns (a
        second SIGTERM must not wait for long rows to finish)."""
        sched = Scheduler(requests, max_batch_tokens=self.max_batch_tokens, max_padding=self.max_padding,
                          check=self._check)
        runner = Runner(self.model, rows=self.max_batch_rows, capacity=self.capacity, eos=self.eos, scan=self.scan,
                        overlap=self.overlap, mirror=self.mirror, counters=self.counters, ar_score=self.ar_score)
        rows: list[Row] = []  # rows[i].slot == i
        try:
            while not (stop is not None and stop()):
                rows += self._schedule(sched, runner)
                if not rows:
                    if sched.drained:
                        return
                    continue
                if not any(r.phase is Phase.DONE for r in rows):
                    self._commit_and_denoise(rows, sched, runner)
                rows, done = self._retire(rows, runner)
                yield from done
        finally:
            runner.close()

    @staticmethod
    def _schedule(sched: Scheduler, runner: Runner) -> list[Row]:
        """Fill the free slots: one batched prefill per group the scheduler admits."""
        new: list[Row] = []
        while runner.free() and not sched.drained:
            reqs = sched.admit(runner.free())
            if reqs:
                new += runner.prefill(reqs)
        return new

    @staticmethod
    def _commit_and_denoise(rows: list[Row], sched: Scheduler, runner: Runner) -> None:
        committing = sched.committing(rows)
        runner.reserve(committing)
        commits = sched.by_commit(committing)
        if runner.overlap and committing:  # committing rows sit out this denoiser step
            runner.commit_while_denoising(commits, sched.denoising(rows))
        else:
            runner.commit(commits)
            runner.denoise(sched.denoising(rows))
        scoring = sched.scoring(rows)  # decided by this denoise: scored now, so they retire at once
        if scoring:
            runner.reserve(scoring)
            runner.commit(sched.by_commit(scoring))

    def _retire(self, rows: list[Row], runner: Runner) -> tuple[list[Row], list[Result]]:
        done = [r for r in rows if r.phase is Phase.DONE]
        if not done:
            return rows, []
        live = runner.release(done, [r for r in rows if r.phase is not Phase.DONE])
        return live, [r.result(self.eos) for r in done]

    def _check(self, req: Request) -> None:
        if not req.prompt_ids:
            raise ValueError(f"row {req.id!r}: empty prompt")
        V = self.model.config.vocab_size
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= V:
            raise ValueError(f"row {req.id!r}: token id outside the vocabulary (0..{V - 1})")
        if req.params.mode != "ar" and self.model.ar_only:
            raise ValueError(f"row {req.id!r}: mode {req.params.mode} needs a denoiser tower; this model is AR only")
