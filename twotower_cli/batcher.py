"""Tokenize prompt rows and order them into length buckets for the engine's refill queue.

Rows are read through a bounded look-ahead window (memory stays flat), tokenized (plain prompts
with the tokenizer's special tokens, chat messages through its chat template), checked against
the model's limits, expanded into one request per sample still to do (n samples of a row share
its tokens), and emitted window by window sorted by (mode, block size, prompt length). The
engine admits rows in this order whenever slots free up, so the rows prefilled together have
similar lengths and the padding of a batched prefill stays small.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

from .config import ConfigError, DecodeParams
from .engine.request import Request, sample_seed
from .engine.stops import StopMatcher
from .errors import UserError
from .io.schema import PromptRow, RejectedRow

# A chat template is code from the checkpoint: it renders under a budget (time, size).
TEMPLATE_SECONDS = 2.0
TEMPLATE_MIN_CHARS = 1 << 20  # the size cap is max(this, 16 characters per position of the context)


class TemplateError(Exception):
    """A chat template broke its budget or failed: `template` says it concerns every row."""

    def __init__(self, reason: str, template: bool = False):
        super().__init__(reason)
        self.template = template


class _OverBudget(BaseException):
    """Raised inside the render (by the tracer) when its deadline passes."""


@dataclass
class BatchPolicy:
    window: int = 2048  # rows read ahead and sorted by length
    max_prompt_tokens: int | None = None  # None: the model's max_position_embeddings - max_new_tokens
    template_seconds: float = TEMPLATE_SECONDS  # per chat-template render


class Batcher:
    def __init__(self, tokenizer: Any, defaults: DecodeParams, max_positions: int, policy: BatchPolicy | None = None,
                 vocab_size: int | None = None):
        self.tok = tokenizer
        self.defaults = defaults
        self.max_positions = max_positions
        self.policy = policy or BatchPolicy()
        self.vocab_size = vocab_size
        self._template_broken: str | None = None  # why the chat template is not used any more
        self._template_ok = self._template_failed = 0
        self._requests = 0

    def encode(self, row: PromptRow) -> Request | RejectedRow:
        """One row -> a Request, or a RejectedRow saying why not."""
        try:
            params = self.defaults.replace(**row.overrides)
        except (ConfigError, TypeError) as e:
            return RejectedRow(row.line_no, row.id, f"bad override: {e}")
        if params.max_new_tokens >= self.max_positions:
            return RejectedRow(row.line_no, row.id,
                               f"max_new_tokens={params.max_new_tokens} leaves no room for a prompt in the "
                               f"model's context of {self.max_positions} tokens")
        try:
            if row.messages is not None:
                ids = self._chat_ids(row.messages)
            else:
                ids = self.tok.encode(row.prompt)
        except TemplateError as e:
            return RejectedRow(row.line_no, row.id, f"chat template: {e}")
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
        stop = StopMatcher(params.stop, self._decode) if params.stop else None
        return Request(row.id, ids, params, meta=row, stop=stop)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @staticmethod
    def samples(req: Request) -> list[Request]:
        """One request per sample still to do of the row (PromptRow.samples), each with its own seed
        (engine.request.sample_seed); they share the tokens and the stop matcher."""
        row = req.meta
        ks = row.samples if isinstance(row, PromptRow) else (0,)
        if list(ks) == [0]:
            return [req]
        p = req.params
        return [dc_replace(req, params=p.replace(seed=sample_seed(p.seed, req.id, k)), sample_index=k) for k in ks]

    # ---- chat templates ----------------------------------------------------------------------------

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Render `messages` with the tokenizer's chat template under the budget, then tokenize
        the text as `apply_chat_template(tokenize=True)` does (no special tokens added)."""
        if self._template_broken is not None:  # it broke its budget once: it would again, at a cost
            raise TemplateError(self._template_broken, template=True)  # the same reason: reruns log it once
        try:
            text = render_within_budget(
                lambda: self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                self.policy.template_seconds, max(TEMPLATE_MIN_CHARS, 16 * self.max_positions))
        except TemplateError as e:
            if e.template:
                self._template_broken = str(e)
            self._template_failed += 1
            raise
        if not isinstance(text, str):
            raise TemplateError(f"rendered a {type(text).__name__}, not text")
        if not text.strip():
            raise TemplateError("these messages render to an empty prompt")
        self._template_ok += 1
        return self.tok.encode(text, add_special_tokens=False)

    def __call__(self, rows: Iterable[PromptRow | RejectedRow]) -> Iterator[Request | RejectedRow]:
        window: list[Request] = []
        for row in rows:
            if isinstance(row, RejectedRow):
                yield row
                continue
            out = self.encode(row)
            if isinstance(out, RejectedRow):
                if self._template_broken and not self._requests and not window and not self._template_ok:
                    # The template broke its budget before any row could be decoded: it is the
                    # checkpoint's fault, not the rows' (and nothing is in flight to lose).
                    raise UserError(f"the checkpoint's chat template cannot be used: {self._template_broken}; "
                                    "fix its chat_template, or give plain 'prompt' rows")
                yield out
                continue
            window.extend(self.samples(out))
            if len(window) >= self.policy.window:
                self._requests += len(window)
                yield from self._sorted(window)
                window = []
        self._requests += len(window)
        yield from self._sorted(window)

    @staticmethod
    def _sorted(window: list[Request]) -> list[Request]:
        return sorted(window, key=lambda r: (r.params.mode, r.params.block_size, len(r.prompt_ids)))


def render_within_budget(render: Any, seconds: float, max_chars: int) -> Any:
    """`render()` in a worker thread that stops itself once `seconds` have passed (a tracer checks
    the deadline at every Python call and at every line of a Jinja template, so a template's
    nested loops end there), and whose result must be at most `max_chars` long. Raises
    TemplateError (`template=True`: the template itself broke the budget); other exceptions of
    `render` propagate."""
    deadline = time.monotonic() + seconds
    out: dict[str, Any] = {}

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OverBudget
        # line events only inside compiled templates (cheap elsewhere: calls only)
        return tracer if frame.f_code.co_filename == "<template>" else None

    def work() -> None:
        sys.settrace(tracer)
        try:
            out["value"] = render()
        except _OverBudget:
            out["timeout"] = True
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = e
        finally:
            sys.settrace(None)

    t = threading.Thread(target=work, name="chat-template", daemon=True)
    t.start()
    t.join(seconds + 1.0)  # a render stuck in C code past the deadline is abandoned (daemon thread)
    if t.is_alive() or out.get("timeout"):
        raise TemplateError(f"rendering took longer than {seconds:g} s", template=True)
    if "error" in out:
        raise out["error"]
    value = out.get("value")
    if isinstance(value, str) and len(value) > max_chars:
        raise TemplateError(f"rendered {len(value)} characters, more than the {max_chars} allowed")
    return value
