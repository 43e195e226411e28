"""One row's decoding state inside the engine: a phase, the tokens so far, the block in progress.

    prefill ──> DENOISE ──(block complete / token chosen)──> COMMIT ──(context read it)──> DENOISE ...
                   └──────────────(output decided: EOS or the token limit)──────────────> DONE

AR rows never denoise: their token comes from the context tower's logits, so they go COMMIT ->
COMMIT until DONE. Speculative rows draft a block [pending token, S-1 masks] with the denoiser
(DENOISE), then the context tower verifies it (COMMIT): the drafts AR agrees with and AR's own next
token are kept, the context state is rolled back to what it keeps, and the next draft starts.
The transitions live here, in plain Python; the tensors live in the runner.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import DecodeParams
from .decode import ended, finish, settled
from .request import Request, Result, Stats


class Phase(enum.Enum):
    DENOISE = "denoise"  # the denoiser runs next: a diffusion block in progress, or mock-AR's next token
    COMMIT = "commit"  # the context tower must first read what the row committed
    SCORE = "score"  # the output is decided; one more context forward scores its unread tokens
    DONE = "done"  # the output is decided (and scored); the row leaves at the next retire


@dataclass(eq=False)
class Row:
    req: Request
    slot: int
    started: float
    phase: Phase = Phase.DENOISE
    out: list[int] = field(default_factory=list)  # every token decided so far (before the final cut)
    xt: Tensor | None = None  # diffusion: the block being denoised (S,)
    k: int = 0  # diffusion: the step within the block
    last: int = -1  # mock-AR: the committed token the context tower has not read yet
    nfe: int = 0  # denoiser forwards
    ctx: int = 1  # context-tower forwards (the prefill is the first)
    blocks: int = 0
    rounds: int = 0  # speculative: verify forwards
    round_tokens: int = 0  # speculative: tokens those verifies committed (accepted drafts + AR's token)
    # The AR score (when `scoring`): the context tower's log p of out[i] and whether out[i] is its
    # greedy choice, for i < len(lp); `prev` the log probs (V,) of the token after what it has read
    # (diffusion: the next block's first token), `read` how many of `out` it has read (diffusion).
    scoring: bool = False
    lp: list[float] = field(default_factory=list)
    hit: list[bool] = field(default_factory=list)
    prev: Tensor | None = None
    read: int = 0
    cut: int = 0  # once decided: the completion's length (what is scored)
    end: int | None = None  # a stop string ended the output: it keeps out[:end]
    seen: int = 0  # diffusion: tokens of the block in progress already checked for stop strings

    @property
    def p(self) -> DecodeParams:
        return self.req.params

    @property
    def commit_width(self) -> int:
        """Tokens the context tower reads at this row's next commit (or final scoring forward)."""
        return self.p.block_size if self.p.mode in ("diffusion", "speculative") else 1

    @property
    def block_start(self) -> int:
        """Output position of the block's first token (keys its sampling noise). A speculative
        block starts with the pending token, the last one decided."""
        return len(self.out) - (self.p.mode == "speculative")

    @property
    def noise_step(self) -> int:
        """Diffusion keys noise by step; speculative drafts with AR's own noise (step 0), which
        makes a sampled draft more likely to be what AR samples."""
        return self.k if self.p.mode == "diffusion" else 0

    def commit_ids(self) -> list[int]:
        """What the context tower reads now. Mock-AR: the token the denoiser read last step (the
        denoiser reads each token at its own position before the context tower does).
        Speculative: the drafted block, to verify. A decided row: what scores the rest."""
        if self.phase is Phase.SCORE:
            return self.score_ids()
        if self.p.mode == "speculative":
            return self.xt.tolist()
        if self.p.mode == "diffusion":
            return self.out[-self.p.block_size:]
        if self.p.mode == "mock-ar":
            ids, self.last = [self.last], self.out[-1]
            return ids
        return [self.out[-1]]

    def committed(self) -> None:
        """The context tower has read this row's commit (or final scoring read)."""
        self.ctx += 1
        if self.phase is Phase.SCORE:
            self.phase = Phase.DONE
            return
        if self.p.mode == "diffusion":
            self.read += self.p.block_size
        self.phase = Phase.DENOISE if self.p.mode != "ar" else Phase.COMMIT

    # -- the AR score ---------------------------------------------------------------------------
    def score(self, lp: list[float], hit: list[bool]) -> None:
        self.lp.extend(lp)
        self.hit.extend(hit)

    def _decided(self, eos: set[int]) -> None:
        """The output is decided: DONE, or SCORE while some of its tokens are unscored and need a
        context forward (diffusion: the last block, which no commit read; mock-AR: the last token)."""
        self.phase = Phase.DONE
        if not self.scoring:
            return
        n = len(self.final(eos)[0])
        if self.p.mode == "diffusion" and self.prev is not None and len(self.lp) < n:
            tok = self.out[len(self.lp)]  # the first unread token: scored by the last forward's logits
            self.score([float(self.prev[tok])], [int(self.prev.argmax()) == tok])
            self.prev = None
        self.cut = n
        if len(self.lp) < n:
            self.phase = Phase.SCORE

    def final(self, eos: set[int]) -> tuple[list[int], str]:
        """The output as written and why it ended: the token limit, the first EOS, or a stop string."""
        out = self.out if self.end is None else self.out[: self.end]
        tokens, reason = finish(out, self.p.max_new_tokens, eos)
        if self.end is not None and reason == "length" and len(tokens) == self.end:
            reason = "stop"
        return tokens, reason

    def _stopped(self, tokens: list[int], new_from: int) -> bool:
        """Whether `tokens` (the output so far) holds a stop string in what came from `new_from` on;
        if so the output is cut there (`end`)."""
        if self.req.stop is None:
            return False
        end = self.req.stop.find(tokens, new_from)
        if end is None:
            return False
        self.end = end
        return True

    def score_ids(self) -> list[int]:
        """What the context tower reads to score the rest: the tokens before each unscored one."""
        if self.p.mode == "mock-ar":
            return [self.last]
        return self.out[len(self.lp) - 1 : self.cut - 1]

    def take(self, token: int, eos: set[int]) -> None:
        """AR / mock-AR: the chosen next token (speculative: AR's first token, from the prefill)."""
        self.out.append(token)
        if ended(self.out, self.p.max_new_tokens, eos, new=1) or self._stopped(self.out, len(self.out) - 1):
            self._decided(eos)
        elif self.p.mode == "speculative":
            self._draft_from(token)
        else:
            self.phase = Phase.COMMIT

    def _draft_from(self, pending: int) -> None:
        """A new speculative block: the pending token (decided, not yet read by the context
        tower), then masks for the denoiser to draft."""
        self.xt = torch.full((self.p.block_size,), self.p.mask_token_id, dtype=torch.long)
        self.xt[0] = pending
        self.k = 0
        self.phase = Phase.DENOISE if self.p.block_size > 1 else Phase.COMMIT  # S = 1: nothing to draft

    def verified(self, accepted: list[int], token: int, eos: set[int]) -> None:
        """Speculative: the drafts AR agreed with, then AR's own token (at the first disagreement,
        or after the whole block). The context tower has kept the pending token and `accepted`."""
        self.out.extend(accepted)
        self.out.append(token)
        self.ctx += 1
        self.rounds += 1
        self.round_tokens += len(accepted) + 1
        new = len(accepted) + 1
        if ended(self.out, self.p.max_new_tokens, eos, new=new) or self._stopped(self.out, len(self.out) - new):
            self._decided(eos)
        else:
            self._draft_from(token)

    def denoised(self, block: Tensor, complete: bool, mask: int, eos: set[int]) -> None:
        """Diffusion / speculative: the block after one denoiser step (S,) on the CPU; `complete`:
        no mask left (a speculative draft then goes to the verify)."""
        self.xt, self.k, self.nfe = block, self.k + 1, self.nfe + 1
        if self.p.mode == "speculative":
            if complete:
                self.phase = Phase.COMMIT
            return
        if complete:
            new = len(self.out) + self.seen
            self.out.extend(block.tolist())
            self.blocks += 1
            self.xt, self.k, self.seen = block.new_full(block.shape, mask), 0, 0
            if ended(self.out, self.p.max_new_tokens, eos, new=len(block)) or self._stopped(self.out, new):
                self._decided(eos)
            else:
                self.phase = Phase.COMMIT
            return
        ids = block.tolist()
        if end := settled(ids, mask, self.p.max_new_tokens - len(self.out), eos):
            self.out.extend(ids[:end])  # the output is decided: the rest would be cut
            self.blocks += 1
            self._decided(eos)
        elif self.req.stop is not None:
            self._stop_in_block(ids, mask, eos)

    def _stop_in_block(self, ids: list[int], mask: int, eos: set[int]) -> None:
        """A diffusion block's committed prefix (the positions up to its first mask) is final: when
        it completes a stop string, the output is decided after this commit, mid-block."""
        prefix = ids.index(mask) if mask in ids else len(ids)
        if prefix <= self.seen:
            return
        tokens = self.out + ids[:prefix]
        if self._stopped(tokens, len(self.out) + self.seen):
            self.out = tokens
            self.blocks += 1
            self._decided(eos)
        else:
            self.seen = prefix

    def result(self, eos: set[int]) -> Result:
        p = self.p
        tokens, reason = self.final(eos)
        stats = Stats(
            mode=p.mode, gamma=p.gamma, block_size=p.block_size, steps_per_block=p.steps_per_block,
            temperature=p.temperature, seed=p.seed, prompt_tokens=len(self.req.prompt_ids),
            completion_tokens=len(tokens), decoded_tokens=len(self.out), denoiser_steps=self.nfe,
            context_forwards=self.ctx, blocks=self.blocks, finish_reason=reason,
            latency_s=time.perf_counter() - self.started,
            accepted_per_round=self.round_tokens / self.rounds if self.rounds else None,
            ar_logprob=sum(self.lp[: len(tokens)]) if self.scoring and tokens else (0.0 if self.scoring else None),
            ar_agreement=sum(self.hit[: len(tokens)]) / len(tokens) if self.scoring and tokens else None,
            top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        )
        return Result(id=self.req.id, tokens=tokens, stats=stats, meta=self.req.meta,
                      sample_index=self.req.sample_index)
