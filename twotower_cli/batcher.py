"""Tokenize prompt rows and order them into length buckets for the engine's refill queue.

Rows are read through a bounded look-ahead window (memory stays flat), tokenized (plain prompts
with the tokenizer's special tokens, chat messages through its chat template), checked against
the model's limits, and emitted window by window sorted by (mode, block size, prompt length). The
engine admits rows in this order whenever slots free up, so the rows prefilled together have
similar lengths and the padding of a batched prefill stays small.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, DecodeParams
from .engine.request import Request
from .io.schema import PromptRow, RejectedRow


@dataclass
class BatchPolicy:
    window: int = 2048  # rows read ahead and sorted by length
    max_prompt_tokens: int | None = None  # None: the model's max_position_embeddings - max_new_tokens


class Batcher:
    def __init__(self, tokenizer: Any, defaults: DecodeParams, max_positions: int, policy: BatchPolicy | None = None,
                 vocab_size: int | None = None):
        self.tok = tokenizer
        self.defaults = defaults
        self.max_positions = max_positions
        self.policy = policy or BatchPolicy()
        self.vocab_size = vocab_size

    def encode(self, row: PromptRow) -> Request | RejectedRow:
        """One row -> a Request, or a RejectedRow saying why not."""
        try:
            params = self.defaults.replace(**row.overrides)
        except (ConfigError, TypeError) as e:
            return RejectedRow(row.line_no, row.id, f"bad override: {e}")
        try:
            if row.messages is not None:
                ids = self.tok.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = self.tok.encode(row.prompt)
        except Exception as e:  # a tokenizer or template failure concerns this row only
            return RejectedRow(row.line_no, row.id, f"cannot tokenize: {type(e).__name__}: {e}".strip()[:300])
        ids = list(ids)
        if not ids:
            return RejectedRow(row.line_no, row.id, "prompt encodes to no tokens")
        if self.vocab_size is not None and max(ids) >= self.vocab_size:
            return RejectedRow(row.line_no, row.id, "tokenizer produced ids outside the model's vocabulary")
        limit = self.policy.max_prompt_tokens or self.max_positions - params.max_new_tokens
        if len(ids) > limit:
            return RejectedRow(row.line_no, row.id,
                               f"prompt too long: {len(ids)} tokens, at most {limit} allowed "
                               f"(with max_new_tokens={params.max_new_tokens})")
        return Request(row.id, ids, params, meta=row)

    def __call__(self, rows: Iterable[PromptRow | RejectedRow]) -> Iterator[Request | RejectedRow]:
        window: list[Request] = []
        for row in rows:
            if isinstance(row, RejectedRow):
                yield row
                continue
            out = self.encode(row)
            if isinstance(out, RejectedRow):
                yield out
                continue
            window.append(out)
            if len(window) >= self.policy.window:
                yield from self._sorted(window)
                window = []
        yield from self._sorted(window)

    @staticmethod
    def _sorted(window: list[Request]) -> list[Request]:
        return sorted(window, key=lambda r: (r.params.mode, r.params.block_size, len(r.prompt_ids)))
