"""What goes into the engine and what comes out of it. No tensors, no files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ..config import SEED_LIMIT, DecodeParams
from .stops import StopMatcher


def row_key(row_id: str) -> int:
    """A stable 63-bit integer for a row id: keys the row's sampling noise (never Python's hash())."""
    return int.from_bytes(hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def sample_seed(seed: int, row_id: str, sample_index: int) -> int:
    """The seed of sample k of a row: the row's seed for k = 0 (one sample decodes as before),
    else a 63-bit hash of (seed, id, k). Noise is keyed by (seed, row key, ...), so sample k
    decoded alone with this seed (n = 1) gives the same tokens whatever its batch."""
    if not sample_index:
        return seed
    data = f"{seed}\x00{row_id}\x00{sample_index}".encode("utf-8", "surrogatepass")
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"twotower-sample").digest(), "little")
    return h % SEED_LIMIT


@dataclass
class Request:
    """One prompt to decode. `prompt_ids` are token ids (the batcher tokenized them). One request
    per sample: `sample_index` k of the row's n, its `params.seed` already the sample's own."""

    id: str
    prompt_ids: list[int]
    params: DecodeParams = field(default_factory=DecodeParams)
    meta: Any = None  # carried through untouched (the pipeline's row payload)
    sample_index: int = 0
    stop: StopMatcher | None = None  # finds the row's stop strings in its output (engine.stops)

    @property
    def key(self) -> int:
        return row_key(self.id)


@dataclass(frozen=True)
class Stats:
    """How one row was decoded. The output columns of the same names (io.schema) are these.

    `steps` is the one definition of a decoding step (docs/SPEC.md): a denoiser forward the row
    took part in (diffusion, mock-AR, speculative's drafts), or a context-tower forward that chose
    a token (AR). A speculative row's verify forwards are counted in `context_forwards`, and
    `accepted_per_round` is the tokens each verify committed (accepted drafts + AR's own token).

    The AR score, in every mode: `ar_logprob` is the sum over the completion's tokens (EOS
    included when emitted) of the context tower's temperature-1 log probability given everything
    before, `ar_agreement` the share of them equal to its greedy choice; None when scoring is off.
    `tokens_per_step` = completion_tokens / steps, the completion as written (cut after the first
    EOS, the EOS counted; `decoded_tokens` also counts what the cut dropped).
    """

    mode: str
    gamma: float
    block_size: int
    steps_per_block: int
    temperature: float
    seed: int
    prompt_tokens: int
    completion_tokens: int
    decoded_tokens: int
    denoiser_steps: int
    context_forwards: int
    blocks: int
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    latency_s: float
    accepted_per_round: float | None = None  # speculative: tokens committed per verify forward
    ar_logprob: float | None = None  # the context tower's log p of the completion (None: not scored)
    ar_agreement: float | None = None  # share of the completion's tokens that are its greedy choice
    top_k: int = 0  # the sampling filters in effect (DecodeParams)
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def steps(self) -> int:
        return self.decoded_tokens if self.mode == "ar" else self.denoiser_steps

    @property
    def tokens_per_step(self) -> float:
        return self.completion_tokens / self.steps if self.steps else 0.0


@dataclass
class Result:
    """A finished row. `tokens` is the completion, cut after the first EOS (the EOS is kept) or
    after the token that completes a stop string."""

    id: str
    tokens: list[int]
    stats: Stats
    meta: Any = None
    sample_index: int = 0
