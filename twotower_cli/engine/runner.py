"""Tensors and forwards: the slot pool, batched prefill, context commits, denoiser steps, overlap.

The runner does what the scheduler decided, one batched forward per group of rows, and hands each
row's new tokens to the row's own transition (engine.row). Everything it computes is per row
(engine.decode), so a row's tokens do not depend on which other rows share a forward.

Overlap (two devices): the commit of the rows that completed a block runs on the context tower's
device in a worker thread while the denoiser steps every other row on its own device; a committing
row sits out that one denoiser step. Without overlap the commit runs first and every row denoises
after it. Either way each row sees the same sequence of forwards, so its tokens are the same.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from ..model.twotower import TwoTower
from .cache import SlotPool
from .decode import ar_scores, choose, commit_mask
from .request import Request
from .row import Phase, Row


class Runner:
    """Owns the model's forwards for one `Engine.run`: the slot pool, the worker thread, counters."""

    def __init__(self, model: TwoTower, *, rows: int, capacity: int, eos: set[int], scan: str,
                 overlap: bool | None, mirror: bool | None, counters: dict[str, int],
                 ar_score: bool | None = None):
        self.model = model
        self.ar_score = ar_score  # see Engine
        self.eos = eos
        self.scan = scan
        self.device = model.context_lm_head.weight.device
        self.den_device = self.device if model.ar_only else model.lm_head.weight.device
        self.overlap = (self.den_device != self.device) if overlap is None else overlap
        self.pool = SlotPool(model, rows, capacity, self.den_device, mirror)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="context-tower") if self.overlap else None
        self.counters = counters

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True)

    def free(self) -> int:
        return self.pool.free()

    # -- prefill ----------------------------------------------------------------------------------
    def prefill(self, reqs: list[Request]) -> list[Row]:
        """One batched (ragged) prefill for the new rows, placed into free slots. AR rows take their
        first token from the prefill's logits; mock-AR rows keep their last prompt token back (the
        denoiser reads it first)."""
        now = time.perf_counter()
        prompts = [r.prompt_ids[:-1] if r.params.mode == "mock-ar" else r.prompt_ids for r in reqs]
        # AR's first token; with the AR score also a diffusion row's first-token log probs
        want = any(r.params.mode in ("ar", "speculative") or (self.ar_score and r.params.mode == "diffusion")
                   for r in reqs)
        free = ("ar", "speculative")
        c = self.counters
        c["prefill_calls"] += 1
        c["prefill_tokens"] += sum(len(p) for p in prompts)
        c["prefill_padded_tokens"] += max(max(len(p) for p in prompts), 1) * len(prompts)
        state, logits = self.model.prefill(prompts, logits=want, scan=self.scan)
        slots = self.pool.admit(state)
        rows = [Row(req=r, slot=s, started=now,
                    scoring=self.ar_score if self.ar_score is not None else r.params.mode in free)
                for r, s in zip(reqs, slots)]
        for b, row in enumerate(rows):
            if row.p.mode == "diffusion":
                row.xt = torch.full((row.p.block_size,), row.p.mask_token_id, dtype=torch.long)
                if row.scoring:
                    row.prev = torch.log_softmax(logits[b], dim=-1)
            elif row.p.mode == "mock-ar":
                row.last = row.req.prompt_ids[-1]
        ar = [b for b, r in enumerate(rows) if r.p.mode in ("ar", "speculative")]  # AR's first token
        if ar:
            self._take_next([rows[b] for b in ar], logits[ar], score=True)
        return rows

    # -- one step: commit and denoise ---------------------------------------------------------------
    def reserve(self, rows: list[Row]) -> None:
        """Grow the cache for the coming commits, in one thread, before any forward holds views."""
        if rows:
            self.pool.reserve(max(int(self.pool.state.lengths[r.slot]) + r.commit_width for r in rows))

    @torch.no_grad()  # also on the overlap's worker thread: grad mode is per thread
    def commit(self, groups: dict[tuple[str, int], list[Row]]) -> None:
        """The context tower reads what each row committed (or verifies its draft): one forward
        per group."""
        for (kind, n), g in groups.items():
            if kind == "verify":
                self._verify(g, n)
            else:
                self._commit(g, n)
        self.counters["context_calls"] += len(groups)

    def commit_while_denoising(self, commits: dict[tuple[str, int], list[Row]],
                               denoise: dict[tuple, list[Row]]) -> None:
        """Overlap: the commits run on the worker thread while the denoiser steps `denoise`."""
        job = self.worker.submit(self.commit, commits)
        try:
            self.denoise(denoise)
        finally:
            job.result()

    def denoise(self, groups: dict[tuple, list[Row]]) -> None:
        for key, g in groups.items():
            if key[0] == "block":
                self._denoise_block(g, key[2])
            else:
                self._denoise_next(g)

    # -- forwards ---------------------------------------------------------------------------------
    def _commit(self, g: list[Row], n: int) -> None:
        """The context tower reads what each row committed (n tokens). A decided row's final
        scoring read (Phase.SCORE) joins the forward with fewer tokens: a ragged read, whose state
        is not used again (the row retires)."""
        slots = [r.slot for r in g]
        ids = [r.commit_ids() for r in g]
        lens = [len(x) for x in ids]
        ragged = min(lens) < n
        ids_t = torch.tensor([x + [0] * (n - len(x)) for x in ids] if ragged else ids, device=self.device)  # (B, n)
        n_valid = torch.tensor(lens, device=self.device) if ragged else None
        state = self.pool.view(slots)
        old = state.lengths.clone()
        ar = [i for i, r in enumerate(g) if r.p.mode == "ar"]
        scored = any(r.scoring and r.p.mode != "ar" for r in g)  # AR rows are scored as they choose
        want = "all" if scored else bool(ar)  # the AR score reads every position's logits
        logits = self.model.context_extend(ids_t, state, n_valid=n_valid, logits=want, scan=self.scan)
        self.pool.write_back(slots, state, old, n)
        if scored:
            self._score_reads(g, ids, logits)
            logits = logits[:, -1]
        for r in g:
            r.committed()
        if ar:
            self._take_next([g[i] for i in ar], logits[ar], score=True)

    def _score_reads(self, g: list[Row], ids: list[list[int]], logits: Tensor) -> None:
        """The AR score from a context read's logits (B, n, V), each position scoring the token
        after it: a diffusion block's tokens after its first (the first was predicted by the
        previous forward's last position, kept in `prev`; this forward's last position is the next
        `prev`), a mock-AR row's newest token, a decided row's unscored tokens. AR rows are
        scored where their token is chosen."""
        B, n, _ = logits.shape
        dev = logits.device
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.full((B, n), -1, dtype=torch.long)  # -1: nothing to score at that position
        diff = []  # diffusion commits
        for b, r in enumerate(g):
            if not r.scoring or r.p.mode == "ar":
                continue
            if r.phase is Phase.SCORE:
                todo = r.out[len(r.lp) : len(r.lp) + len(ids[b])]
                targets[b, : len(todo)] = torch.tensor(todo, dtype=torch.long)
            elif r.p.mode == "diffusion":
                targets[b, : n - 1] = torch.tensor(ids[b][1:], dtype=torch.long)
                diff.append(b)
            elif r.p.mode == "mock-ar":
                targets[b, 0] = r.out[-1]
        targets = targets.to(dev)
        lp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0].tolist()
        hit = (logits.argmax(-1) == targets).tolist()
        firsts = {}
        if diff:
            prev = torch.stack([g[b].prev for b in diff])  # (D, V)
            first = torch.tensor([ids[b][0] for b in diff], device=dev)
            f_lp = prev.gather(1, first[:, None])[:, 0].tolist()
            f_hit = (prev.argmax(-1) == first).tolist()
            firsts = {b: (f_lp[j], f_hit[j]) for j, b in enumerate(diff)}
            nxt = logp[diff, -1]  # (D, V): the next block's first token
            for j, b in enumerate(diff):
                g[b].prev = nxt[j]
        tl = targets.tolist()
        for b, r in enumerate(g):
            if b in firsts:
                r.score([firsts[b][0]], [firsts[b][1]])
            keep = [j for j in range(n) if tl[b][j] >= 0]
            if keep:
                r.score([lp[b][j] for j in keep], [hit[b][j] for j in keep])

    def _verify(self, g: list[Row], S: int) -> None:
        """Speculative: the context tower reads each drafted block [pending, d1 .. d(S-1)] with
        logits at every position; AR's token at each position is what AR mode would choose there
        (same rule, same noise). Drafts are kept while they equal AR's; AR's token follows (the
        correction, or the bonus after a fully accepted block). The state is rolled back to the
        pending token plus the accepted drafts, with no second forward."""
        slots = [r.slot for r in g]
        ids = torch.tensor([r.commit_ids() for r in g], device=self.device)  # (B, S)
        state = self.pool.view(slots)
        start = state.lengths.clone()
        kept: dict = {}
        logits = self.model.context_extend(ids, state, logits="all", scan=self.scan, keep=kept)  # (B, S, V)
        dev = logits.device
        steps = torch.zeros(len(g), dtype=torch.long, device=dev)
        ar, _ = choose(logits, *_row_tensors(g, dev), _positions(g, S, dev), steps, _row_filters(g))  # (B, S)
        agree = (ids[:, 1:].to(dev) == ar[:, :-1]).long().cumprod(1)  # (B, S-1) drafts AR agrees with so far
        accepted = agree.sum(1)  # (B,)
        self.model.context_rollback(state, kept, start, 1 + accepted)
        self.pool.write_back(slots, state, start, S)
        if any(r.scoring for r in g):  # the drafts kept and AR's token, each scored at the position before it
            targets = torch.cat([ids[:, 1:].to(dev), ar[:, -1:]], dim=1)  # (B, S)
            targets.scatter_(1, accepted[:, None], ar.gather(1, accepted[:, None]))
            lp, hit = ar_scores(logits, targets)
            for r, a, l_, h_ in zip(g, accepted.tolist(), lp.tolist(), hit.tolist()):
                if r.scoring:
                    r.score(l_[: a + 1], h_[: a + 1])
        for r, a, block, choice in zip(g, accepted.tolist(), ids.tolist(), ar.tolist()):
            r.verified(block[1 : 1 + a], choice[a], self.eos)

    def _denoise_block(self, g: list[Row], mask: int) -> None:
        """One denoiser step for blocks in progress (diffusion blocks, speculative drafts), then
        the threshold commit rule per row."""
        dev = self.den_device
        state = self.pool.den_view([r.slot for r in g])
        xt = torch.stack([r.xt for r in g]).to(dev)  # (B, S)
        S = xt.shape[1]
        masked = xt == mask
        if any(r.p.mode == "speculative" for r in g):  # a pending token is decided, even if it is the mask id
            masked[:, 0] &= torch.tensor([r.p.mode != "speculative" for r in g], device=dev)
        t = masked.float().mean(1)  # (B,) per row
        logits = self.model.denoise(xt, state, t, scan=self.scan)  # (B, S, V)
        self.counters["denoiser_calls"] += 1
        logits[..., mask] = -float("inf")  # the mask id is never proposed
        k = torch.tensor([r.k for r in g], device=dev)
        T = torch.tensor([r.p.steps_per_block for r in g], device=dev)
        gamma = torch.tensor([r.p.gamma for r in g], dtype=torch.float32, device=dev)
        noise_step = torch.tensor([r.noise_step for r in g], device=dev)
        # the filters' floor is taken over these logits, the mask id's already -inf
        pred, conf = choose(logits, *_row_tensors(g, dev), _block_positions(g, S, dev), noise_step, _row_filters(g))
        take = commit_mask(conf, masked, gamma, k, T)
        xt = torch.where(take, pred, xt)
        complete = ~(masked & ~take).any(1)
        for r, x, c in zip(g, xt.cpu(), complete.tolist()):
            r.denoised(x, c, mask, self.eos)

    def _denoise_next(self, g: list[Row]) -> None:
        """Mock-AR: the denoiser reads each row's last token over the context of the rest."""
        state = self.pool.den_view([r.slot for r in g])
        last = torch.tensor([[r.last] for r in g], device=self.den_device)
        logits = self.model.denoise(last, state, None, scan=self.scan)[:, 0]  # (B, V)
        self.counters["denoiser_calls"] += 1
        for r in g:
            r.nfe += 1
        self._take_next(g, logits)

    def _take_next(self, rows: list[Row], logits: Tensor, score: bool = False) -> None:
        """AR / mock-AR: each row's next token from logits (B, V). score: the logits are the
        context tower's, so they also give the chosen token's AR score."""
        dev = logits.device
        step = torch.zeros(len(rows), dtype=torch.long, device=dev)
        pred, _ = choose(logits[:, None, :], *_row_tensors(rows, dev), _positions(rows, 1, dev), step,
                         _row_filters(rows))
        pred = pred[:, 0]
        if score and any(r.scoring for r in rows):
            lp, hit = ar_scores(logits, pred)
            for row, l_, h_ in zip(rows, lp.tolist(), hit.tolist()):
                if row.scoring:
                    row.score([l_], [h_])
        for row, tok in zip(rows, pred.tolist()):
            row.take(tok, self.eos)

    # -- retire -----------------------------------------------------------------------------------
    def release(self, done: list[Row], live: list[Row]) -> list[Row]:
        """Free the slots of `done`; returns `live` renumbered (the pool stays dense) in slot order."""
        moved = self.pool.release([r.slot for r in done])
        for r in live:
            r.slot = moved.get(r.slot, r.slot)
        return sorted(live, key=lambda r: r.slot)


def _row_tensors(rows: list[Row], dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row sampling inputs: temperature, seed and row key."""
    temp = torch.tensor([r.p.temperature for r in rows], dtype=torch.float32, device=dev)
    seed = torch.tensor([r.p.seed for r in rows], dtype=torch.long, device=dev)
    key = torch.tensor([r.req.key for r in rows], dtype=torch.long, device=dev)
    return temp, seed, key


def _row_filters(rows: list[Row]) -> tuple[Tensor, Tensor, Tensor] | None:
    """Per-row sampling filters (top_k, top_p, min_p), on the host (`sampling_floor` decides there
    which rows to compute), or None when no row has one on: the unfiltered path does nothing more.
    A row whose filters do nothing (temperature 0) gets them off."""
    on = [r.p.filters for r in rows]
    if not any(on):
        return None
    top_k = torch.tensor([r.p.top_k if f else 0 for r, f in zip(rows, on)], dtype=torch.long)
    top_p = torch.tensor([r.p.top_p if f else 1.0 for r, f in zip(rows, on)], dtype=torch.float64)
    min_p = torch.tensor([r.p.min_p if f else 0.0 for r, f in zip(rows, on)], dtype=torch.float64)
    return top_k, top_p, min_p


def _positions(rows: list[Row], width: int, dev: torch.device) -> Tensor:
    """Absolute output positions (B, width) of the next tokens to choose (they key the noise)."""
    base = torch.tensor([len(r.out) for r in rows], dtype=torch.long, device=dev)
    return base[:, None] + torch.arange(width, device=dev)


def _block_positions(rows: list[Row], width: int, dev: torch.device) -> Tensor:
    """Absolute output positions (B, width) of a block's tokens (speculative: from the pending one)."""
    base = torch.tensor([r.block_start for r in rows], dtype=torch.long, device=dev)
    return base[:, None] + torch.arange(width, device=dev)

