"""Block-granular continuous batching: which rows denoise, which commit, and refilling free slots.

Every row is its own state machine: prefill -> [denoise steps -> commit] ... -> done. One engine
step is

    commit    one batched context-tower forward per token count for the rows that need one:
              diffusion rows whose block completed read S tokens, AR / mock-AR rows read one
    denoise   one batched denoiser forward for all rows mid-block (per (S, mask id) group), then
              the vectorised commit rule; mock-AR rows get their next token from the same tower
    retire    rows that hit EOS or their limit leave at once; their slots are refilled from the
              request stream with one batched prefill

so rows at different blocks, with different prompt lengths and settings, share every forward, and
one slow row never stalls the others.

Overlap (two devices): the commit of the rows that completed a block runs on the context tower's
device while the denoiser steps every other row on its own device; a committing row sits out that
one denoiser step. Without overlap the commit runs first and every row denoises after it. Either
way each row sees the same sequence of forwards, so its tokens are the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import DecodeParams
from ..model.twotower import TwoTower
from .cache import SlotPool
from .decode import choose, commit_mask, settled
from .request import Request, Result, Stats


@dataclass
class _Row:
    req: Request
    slot: int
    started: float
    out: list[int] = field(default_factory=list)
    xt: Tensor | None = None  # diffusion: the block being denoised (S,)
    k: int = 0  # diffusion: step within the block
    last: int = -1  # mock-AR: the committed token the context has not read yet
    needs_commit: bool = False  # the context tower must read something before the next denoise
    nfe: int = 0
    ctx: int = 0
    blocks: int = 0
    finished: bool = False

    @property
    def p(self) -> DecodeParams:
        return self.req.params


def finish_tokens(out: list[int], max_new: int, eos: set[int]) -> tuple[list[int], str]:
    """Cut at max_new tokens, then after the first EOS (kept)."""
    out = out[:max_new]
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1], "eos"
    return out, "length"


class Engine:
    """Decode a stream of `Request`s; `run` yields each `Result` as soon as its row finishes.

    overlap: run context commits concurrently with denoiser steps (default: when the towers are on
    different devices). mirror: keep the denoiser's copy of the context state even on one device
    (tests the two-device bookkeeping without two devices).
    """

    def __init__(self, model: TwoTower, *, max_batch_rows: int = 32, max_batch_tokens: int = 16384,
                 eos_ids: Iterable[int] | None = None, scan: str = "auto", capacity: int = 256,
                 overlap: bool | None = None, mirror: bool | None = None, max_padding: float = 0.05):
        if max_batch_rows < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_rows and max_batch_tokens must be at least 1")
        self.model = model
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens  # padded tokens in one batched prefill
        self.max_padding = max_padding  # largest share of padding in one batched prefill
        self.eos = set(model.config.eos_ids if eos_ids is None else eos_ids)
        self.scan = scan
        self.capacity = capacity
        self.device = model.context_lm_head.weight.device
        self.den_device = self.device if model.ar_only else model.lm_head.weight.device
        self.overlap = (self.den_device != self.device) if overlap is None else overlap
        self.mirror = mirror
        # prefill accounting: real prompt tokens vs padded positions computed (padding waste)
        self.counters = {"prefill_calls": 0, "prefill_tokens": 0, "prefill_padded_tokens": 0,
                         "denoiser_calls": 0, "context_calls": 0}

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, requests: Iterable[Request], stop: Callable[[], bool] | None = None) -> Iterator[Result]:
        """`stop()` is asked before every step: True abandons the rows in flight and returns (a
        second SIGTERM must not wait for long rows to finish)."""
        source = iter(requests)
        pool = SlotPool(self.model, self.max_batch_rows, self.capacity, self.den_device, self.mirror)
        worker = ThreadPoolExecutor(1, thread_name_prefix="context-tower") if self.overlap else None
        rows: list[_Row] = []  # rows[i].slot == i
        held: Request | None = None  # pulled from the stream but not admitted (token budget)
        exhausted = False
        try:
            while True:
                if stop is not None and stop():
                    return
                while pool.free() and (held is not None or not exhausted):
                    new, held, exhausted = self._next_prefill(source, held, exhausted, pool.free())
                    if new:
                        rows.extend(self._admit(new, pool))
                if not rows:
                    if exhausted:
                        return
                    continue
                if not any(r.finished for r in rows):
                    self._step(rows, pool, worker)
                done = [r for r in rows if r.finished]
                if done:
                    moved = pool.release([r.slot for r in done])
                    keep = [r for r in rows if not r.finished]
                    for r in keep:
                        r.slot = moved.get(r.slot, r.slot)
                    rows = sorted(keep, key=lambda r: r.slot)
                    for r in done:
                        yield self._result(r)
        finally:
            if worker:
                worker.shutdown(wait=True)

    def _next_prefill(self, source: Iterator[Request], held: Request | None, exhausted: bool,
                      free: int) -> tuple[list[Request], Request | None, bool]:
        """The next rows to prefill together: up to `free`, within the padded-token budget, and
        closed early when the next row would push the padding past `max_padding` (rows arrive
        length-sorted from the batcher, so this rarely splits a batch; it stops a short row and a
        long one from sharing a prefill). Returns (rows, the row held back, exhausted)."""
        new: list[Request] = []
        longest = real = 0
        while len(new) < free:
            if held is None:
                held = next(source, None)
                if held is None:
                    return new, None, True
                self._check(held)
            L = len(held.prompt_ids)
            n = max(longest, L)
            padded = n * (len(new) + 1)
            if new and (padded > self.max_batch_tokens or 1 - (real + L) / padded > self.max_padding):
                break  # keep it for the next prefill
            new.append(held)
            longest, real, held = n, real + L, None
        return new, held, exhausted

    def _check(self, req: Request) -> None:
        if not req.prompt_ids:
            raise ValueError(f"row {req.id!r}: empty prompt")
        V = self.model.config.vocab_size
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= V:
            raise ValueError(f"row {req.id!r}: token id outside the vocabulary (0..{V - 1})")
        if req.params.mode != "ar" and self.model.ar_only:
            raise ValueError(f"row {req.id!r}: mode {req.params.mode} needs a denoiser tower; this model is AR only")

    # ---------------------------------------------------------------------------------------------
    def _admit(self, reqs: list[Request], pool: SlotPool) -> list[_Row]:
        """One batched prefill for the new rows (ragged), then into free slots."""
        now = time.perf_counter()
        lens = [len(r.prompt_ids) - (1 if r.params.mode == "mock-ar" else 0) for r in reqs]
        n = max(max(lens), 1)
        ids = torch.zeros(len(reqs), n, dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, : lens[b]] = torch.tensor(r.prompt_ids[: lens[b]], dtype=torch.long)
        state = self.model.new_state(len(reqs))
        want = any(r.params.mode == "ar" for r in reqs)
        self.counters["prefill_calls"] += 1
        self.counters["prefill_tokens"] += sum(lens)
        self.counters["prefill_padded_tokens"] += n * len(reqs)
        logits = self.model.context_extend(ids.to(self.device), state, n_valid=torch.tensor(lens, device=self.device),
                                           logits=want, scan=self.scan)
        slots = pool.admit(state)
        rows = [_Row(req=r, slot=s, started=now, ctx=1) for r, s in zip(reqs, slots)]
        for row in rows:
            if row.p.mode == "diffusion":
                row.xt = torch.full((row.p.block_size,), row.p.mask_token_id, dtype=torch.long)
            elif row.p.mode == "mock-ar":
                row.last = row.req.prompt_ids[-1]
        ar = [b for b, r in enumerate(rows) if r.p.mode == "ar"]
        if ar:
            self._take_next([rows[b] for b in ar], logits[ar])
        return rows

    def _take_next(self, rows: list[_Row], logits: Tensor) -> None:
        """AR / mock-AR: choose each row's next token from logits (B, V) and append it."""
        dev = logits.device
        step = torch.zeros(len(rows), dtype=torch.long, device=dev)
        pred, _ = choose(logits[:, None, :], *self._row_tensors(rows, dev), self._pos(rows, 1, dev), step)
        for row, tok in zip(rows, pred[:, 0].tolist()):
            row.out.append(tok)
            row.finished = tok in self.eos or len(row.out) >= row.p.max_new_tokens
            row.needs_commit = not row.finished

    @staticmethod
    def _row_tensors(rows: list[_Row], dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        temp = torch.tensor([r.p.temperature for r in rows], dtype=torch.float32, device=dev)
        seed = torch.tensor([r.p.seed for r in rows], dtype=torch.long, device=dev)
        key = torch.tensor([r.req.key for r in rows], dtype=torch.long, device=dev)
        return temp, seed, key

    @staticmethod
    def _pos(rows: list[_Row], width: int, dev: torch.device) -> Tensor:
        base = torch.tensor([len(r.out) for r in rows], dtype=torch.long, device=dev)
        return base[:, None] + torch.arange(width, device=dev)

    # ---------------------------------------------------------------------------------------------
    def _step(self, rows: list[_Row], pool: SlotPool, worker: ThreadPoolExecutor | None) -> None:
        committing = [r for r in rows if r.needs_commit]
        if committing:
            # grow buffers here, in one thread, before any forward holds views of them
            need = max(int(pool.state.lengths[r.slot]) + self._commit_width(r) for r in committing)
            pool.reserve(need)
        if worker is not None and committing:
            others = [r for r in rows if not r.needs_commit and r.p.mode != "ar"]
            job = worker.submit(self._commit_all, committing, pool)
            try:
                if others:
                    self._denoise_all(others, pool)
            finally:
                self.counters["context_calls"] += job.result()
        else:
            if committing:
                self.counters["context_calls"] += self._commit_all(committing, pool)
            ready = [r for r in rows if not r.finished and not r.needs_commit and r.p.mode != "ar"]
            if ready:
                self._denoise_all(ready, pool)

    @staticmethod
    def _commit_width(r: _Row) -> int:
        return r.p.block_size if r.p.mode == "diffusion" else 1

    def _denoise_all(self, rows: list[_Row], pool: SlotPool) -> None:
        groups: dict[tuple, list[_Row]] = {}
        for r in rows:
            key = ("diffusion", r.p.block_size, r.p.mask_token_id) if r.p.mode == "diffusion" else ("mock-ar",)
            groups.setdefault(key, []).append(r)
        for key, g in groups.items():
            if key[0] == "diffusion":
                self._denoise_block(g, pool, key[2])
            else:
                self._denoise_next(g, pool)

    def _denoise_block(self, g: list[_Row], pool: SlotPool, mask: int) -> None:
        """One denoiser step for rows mid-block; a row whose block completes needs a commit."""
        dev = self.den_device
        state = pool.den_view([r.slot for r in g])
        xt = torch.stack([r.xt for r in g]).to(dev)  # (B, S)
        S = xt.shape[1]
        masked = xt == mask
        t = masked.float().mean(1)  # (B,) per row
        logits = self.model.denoise(xt, state, t, scan=self.scan)  # (B, S, V)
        self.counters["denoiser_calls"] += 1
        logits[..., mask] = -float("inf")  # the mask id is never proposed
        k = torch.tensor([r.k for r in g], device=dev)
        T = torch.tensor([r.p.steps_per_block for r in g], device=dev)
        gamma = torch.tensor([r.p.gamma for r in g], dtype=torch.float32, device=dev)
        pred, conf = choose(logits, *self._row_tensors(g, dev), self._pos(g, S, dev), k)
        take = commit_mask(conf, masked, gamma, k, T)
        xt = torch.where(take, pred, xt)
        complete = ~(xt == mask).any(1)
        for r, x, c in zip(g, xt.cpu(), complete.tolist()):
            r.xt, r.k, r.nfe = x, r.k + 1, r.nfe + 1
            if not c and (end := settled(x.tolist(), mask, r.p.max_new_tokens - len(r.out), self.eos)):
                r.out.extend(x[:end].tolist())  # the output is decided: the rest would be cut
                r.blocks += 1
                r.finished, r.needs_commit = True, False
            elif c:
                r.out.extend(x.tolist())
                r.blocks += 1
                r.xt, r.k = torch.full_like(x, mask), 0
                cut = r.out[: r.p.max_new_tokens]
                r.finished = len(r.out) >= r.p.max_new_tokens or any(tok in self.eos for tok in cut)
                r.needs_commit = not r.finished

    def _denoise_next(self, g: list[_Row], pool: SlotPool) -> None:
        """Mock-AR: the denoiser reads each row's last token over the context of the rest."""
        state = pool.den_view([r.slot for r in g])
        last = torch.tensor([[r.last] for r in g], device=self.den_device)
        logits = self.model.denoise(last, state, None, scan=self.scan)[:, 0]  # (B, V)
        self.counters["denoiser_calls"] += 1
        for r in g:
            r.nfe += 1
        self._take_next(g, logits)

    def _commit_all(self, rows: list[_Row], pool: SlotPool) -> int:
        """The context tower reads what each row committed, one forward per token count."""
        by_width: dict[int, list[_Row]] = {}
        for r in rows:
            by_width.setdefault(self._commit_width(r), []).append(r)
        for n, g in by_width.items():
            self._commit(sorted(g, key=lambda r: r.slot), n, pool)
        return len(by_width)

    def _commit(self, g: list[_Row], n: int, pool: SlotPool) -> None:
        slots = [r.slot for r in g]
        ids = []
        for r in g:
            if r.p.mode == "diffusion":
                ids.append(r.out[-n:])
            elif r.p.mode == "mock-ar":
                ids.append([r.last])  # the context reads the token the denoiser read last step
                r.last = r.out[-1]
            else:
                ids.append([r.out[-1]])
        state = pool.view(slots)
        old = state.lengths.clone()
        ar = [i for i, r in enumerate(g) if r.p.mode == "ar"]
        logits = self.model.context_extend(torch.tensor(ids, device=self.device), state, logits=bool(ar),
                                           scan=self.scan)
        pool.write_back(slots, state, old, n)
        for r in g:
            r.ctx += 1
            r.needs_commit = False
        if ar:
            self._take_next([g[i] for i in ar], logits[ar])

    # ---------------------------------------------------------------------------------------------
    def _result(self, r: _Row) -> Result:
        p = r.p
        tokens, reason = finish_tokens(r.out, p.max_new_tokens, self.eos)
        stats = Stats(
            mode=p.mode, gamma=p.gamma, block_size=p.block_size, steps_per_block=p.steps_per_block,
            temperature=p.temperature, seed=p.seed, prompt_tokens=len(r.req.prompt_ids),
            completion_tokens=len(tokens), decoded_tokens=len(r.out), denoiser_steps=r.nfe,
            context_forwards=r.ctx, blocks=r.blocks, finish_reason=reason, latency_s=time.perf_counter() - r.started,
        )
        return Result(id=r.req.id, tokens=tokens, stats=stats, meta=r.req.meta)
