"""Input rows: JSONL, OpenAI batch lines, Parquet or stdin -> `PromptRow` | `RejectedRow`.

Streaming: one line (JSONL) or one record batch (Parquet) at a time, so memory stays flat whatever
the file size; the only state that grows is the set of ids seen (needed to reject duplicates),
16 bytes per id (io.idset), and the count of repeats of each id-less content.
A bad row never stops the read: it becomes a `RejectedRow` with a deterministic reason and the
next row is read. Only a source that cannot be read at all raises `InputError`.

Row rules (decided here, documented in README's input section):
- JSONL: `prompt` (or `prompt_field`) text, or `messages` [{role, content}], not both. Blank lines
  are skipped silently (they carry no row). Other keys are kept as the row's `metadata` (a JSON
  object in the output), so outputs join back to their sources; a Parquet input's other columns
  pass through as typed columns (`Rows.extra_fields`), except those named like an output column,
  which go into `metadata`.
- Decoding fields (`OVERRIDE_FIELDS`) are per-row settings, never metadata. A sampling field the
  engine cannot honour (`UNSUPPORTED`, e.g. `logit_bias`, `logprobs`, `response_format`) rejects
  the row with a reason unless its value is the neutral one (e.g. `presence_penalty: 0`): no field
  that changes sampling is ignored silently.
- A JSON `null` means "absent" (for the id and every override), because Parquet columns are null
  for rows that do not set them and both formats must behave the same.
- OpenAI batch lines are recognised per line by a `custom_id` key: the id is `custom_id`,
  `body.messages`/`body.prompt` the prompt, `body.max_tokens` (or `max_completion_tokens`),
  `temperature`, `seed`, `n`, `stop`, `top_p` (and the common extensions `top_k`, `min_p`) the
  overrides; `body.metadata` and top-level keys other than custom_id/method/url/body are
  metadata; `model`, `user`, `store` are accepted and not used. Any other body field is refused
  with a reason (known but unsupported, or unknown).
- Ids may be strings or integers (Parquet/HF datasets often use int ids); both become strings. An
  id holding a NUL character is rejected (output keys use NUL to join an id and a sample index).
- A row without an id gets `h-<24 hex>` = blake2b-96 of the canonical JSON of its prompt/messages
  and overrides; the k-th repeat (k >= 1) of identical content gets `h-<hex>-<k>`. Identical
  content is interchangeable, so numbering repeats in file order is stable on every rerun, and
  editing other rows never changes a row's id (which keeps resume correct after input edits).
- Duplicate ids (explicit, or explicit colliding with derived): the later row is rejected. A
  rejected row does not claim its id.
- `limit` counts input rows (good or rejected, blank lines excluded): "the first N rows".
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import ConfigError, DecodeParams
from .idset import IdSet
from .schema import InputError, PromptRow, RejectedRow, SourceFormat, passthrough_fields

__all__ = ["read_rows", "Rows", "row_excerpt", "PromptRow", "RejectedRow", "InputError", "OVERRIDE_FIELDS",
           "MAX_LINE_BYTES"]

OVERRIDE_FIELDS = ("gamma", "max_new_tokens", "temperature", "mode", "seed", "top_k", "top_p", "min_p", "stop", "n")
# Sampling fields of the OpenAI API (and of common servers) that the engine cannot honour: a row
# that sets one to anything but its neutral value is rejected, never decoded as if it were absent.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},), "logprobs": (False, 0), "top_logprobs": (0,), "presence_penalty": (0,),
    "frequency_penalty": (0,), "repetition_penalty": (1,), "echo": (False,), "best_of": (1,),
    "stream": (False,), "stream_options": (), "response_format": ({"type": "text"},), "tools": ([],),
    "tool_choice": ("none",), "functions": ([],), "function_call": ("none",), "parallel_tool_calls": (),
    "suffix": ("",), "audio": (), "modalities": (["text"],), "prediction": (), "reasoning_effort": (),
    "web_search_options": (), "min_tokens": (0,), "ignore_eos": (False,), "stop_token_ids": ([],),
    "logits_processors": ([],), "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
    "length_penalty": (1,), "use_beam_search": (False,), "typical_p": (1,),
}
UNSUPPORTED = tuple(_NEUTRAL)
# OpenAI body fields that are accepted and not used (the run's own model and storage settings apply).
_OPENAI_IGNORED = ("model", "user", "store", "service_tier")
_OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
MAX_LINE_BYTES = 16 << 20  # a longer line is rejected without being held in memory
EXCERPT_CHARS = 200
PARQUET_BATCH_ROWS = 1024
_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"


class _Reject(Exception):
    """Internal: carries a rejection reason (and the id, when one was valid) out of validation."""

    def __init__(self, reason: str, row_id: str | None = None):
        super().__init__(reason)
        self.reason, self.row_id = reason, row_id


class Rows:
    """The rows of one source, in order (an iterator). After iteration ends, `exhausted` says
    whether the whole input was read: False when `limit` stopped it with more rows left, None
    while unknown (not iterated to the end yet).

    A source that breaks part-way (a truncated gzip stream, a corrupt Parquet page, an I/O error)
    ends the iteration there, so every row read before it is decoded and committed as usual; the
    error is kept and raised as `InputError` (exit 2, one line) when `exhausted` is asked for,
    i.e. once the run has committed what it could read."""

    def __init__(self, records: Iterator[_Record], more: _More, prompt_field: str, id_field: str,
                 limit: int | None, name: str = "input"):
        self._exhausted: bool | None = None
        self.error: InputError | None = None
        self.name = name
        # a Parquet input's pass-through columns (typed output columns); none for JSONL
        self.extra_fields: list[pa.Field] = list(getattr(records, "extra_fields", []))
        self._it = self._rows(records, more, prompt_field, id_field, limit)

    @property
    def exhausted(self) -> bool | None:
        if self.error is not None:
            raise self.error
        return self._exhausted

    def __iter__(self) -> Rows:
        return self

    def __next__(self) -> PromptRow | RejectedRow:
        return next(self._it)

    def _rows(self, records: Iterator[_Record], more: _More, prompt_field: str, id_field: str,
              limit: int | None) -> Iterator[PromptRow | RejectedRow]:
        typed = frozenset(f.name for f in self.extra_fields)
        seen = IdSet()
        repeats = _Repeats()  # occurrences so far of each content (rows without an id only)
        n = 0
        if limit == 0:
            self._exhausted = not more(records)
            return
        try:
            for line_no, raw, obj, fmt in records:
                yield _validate(line_no, raw, obj, fmt, prompt_field, id_field, seen, repeats, typed)
                n += 1
                if limit is not None and n >= limit:
                    # Before reading another row: with stdin, unread input stays unread.
                    self._exhausted = not more(records)
                    return
        except InputError as e:  # the rest is unreadable: keep what was read, report it at the end
            self._exhausted = False
            cause = str(e).rstrip(". ")
            self.error = InputError(f"{cause}; the {n} row(s) read before it were kept; repair the input and "
                                    "rerun the same command to do the rest")
            return
        self._exhausted = True


def read_rows(
    source: str | Path,
    *,
    prompt_field: str = "prompt",
    id_field: str = "id",
    limit: int | None = None,
) -> Rows:
    """Every input row in order, valid or rejected. `source` is a path or "-" for stdin.

    Raises InputError (one line, for exit code 2) when the source cannot be opened or is not a
    readable Parquet file; that is checked eagerly, before the first row is requested.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InputError(f"limit must be a non-negative integer, got {limit!r}")
    records, more = _open_records(source, prompt_field, id_field)
    return Rows(records, more, prompt_field, id_field, limit, name=_display(source))


def _display(source: str | Path) -> str:
    """A path for messages: a name that is not valid UTF-8 is shown with escapes, never an error."""
    s = str(source)
    return "<stdin>" if s == "-" else s.encode("utf-8", "backslashreplace").decode("utf-8")


def row_excerpt(row: PromptRow) -> str:
    """An excerpt of a valid row's prompt, for the error record of a row rejected after reading
    (e.g. a prompt too long for the model)."""
    return row.prompt_text()[:EXCERPT_CHARS]


# ---- sources: yield (line_no, raw input, parsed dict | _Reject, format) --------------------------

_Record = tuple[int, "bytes | dict[str, Any]", "dict[str, Any] | _Reject", SourceFormat]
# Whether the source holds another row after `limit` stopped the read (for `Rows.exhausted`).
_More = Callable[[Iterator[_Record]], bool]


def _next_record(records: Iterator[_Record]) -> bool:
    """A file: read one more record (cheap), then close the source."""
    try:
        return next(records, None) is not None
    finally:
        close = getattr(records, "close", None)
        if close:
            close()


def _peek_more(stream: Any) -> _More:
    """stdin: look at what is buffered without consuming it (the rest of the pipe stays unread);
    only blank lines left count as no more rows."""

    def more(_records: Iterator[_Record]) -> bool:
        try:
            head = stream.peek(1 << 16)
        except (OSError, ValueError, EOFError, AttributeError):
            return True  # unknown: do not claim the input was consumed
        return bool(head.strip())

    return more


def _open_records(source: str | Path, prompt_field: str, id_field: str) -> tuple[Iterator[_Record], _More]:
    if str(source) == "-":
        if sys.stdin is None or getattr(sys.stdin, "closed", False):  # e.g. started by a service manager with no stdin
            raise InputError("input '-' given but there is no standard input")
        stream = getattr(sys.stdin, "buffer", sys.stdin)
        if not hasattr(stream, "peek"):
            stream = io.BufferedReader(stream)  # so the format can be sniffed without consuming it
        return _stream_records(stream, "<stdin>", prompt_field, id_field, close=False)
    path = Path(source)
    name = _display(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the generator that owns it
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            # a FIFO, a device, <(zcat ...): read once, as stdin is (no seek)
            return _stream_records(f, name, prompt_field, id_field, close=True)
        head = f.read(4)
        f.seek(0)
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise InputError(f"cannot read {name}: {getattr(e, 'strerror', None) or e}") from None
    if head == _PARQUET_MAGIC or path.suffix.lower() in (".parquet", ".pq"):
        return _parquet_records(f, name, prompt_field, id_field), _next_record
    if head.startswith(_GZIP_MAGIC):
        return _jsonl_records(gzip.GzipFile(fileobj=f, mode="rb"), close=True, owner=f, name=name), _next_record
    return _jsonl_records(f, close=True, name=name), _next_record


def _stream_records(stream: Any, name: str, prompt_field: str, id_field: str,
                    close: bool) -> tuple[Iterator[_Record], _More]:
    """A source that can be read only once (stdin, a pipe): sniffed with peek, never seeked."""
    head = stream.peek(4)[:4]
    if head.startswith(_PARQUET_MAGIC):
        # Parquet keeps its index at the end of the file, so it cannot be streamed from a pipe:
        # spool to a temporary file (disk, not memory) and read that.
        spool = tempfile.TemporaryFile(prefix="twotower-stdin-", suffix=".parquet")
        shutil.copyfileobj(stream, spool, 1 << 20)
        spool.seek(0)
        if close:
            stream.close()
        return _parquet_records(spool, name, prompt_field, id_field), _next_record
    owner = stream if close else None
    if head.startswith(_GZIP_MAGIC):
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    return _jsonl_records(stream, close=close, owner=owner, name=name), _peek_more(stream)


def _jsonl_records(f: IO[bytes], *, close: bool, owner: IO[bytes] | None = None,
                   name: str = "input") -> Iterator[_Record]:
    line_no = 0
    try:
        for line_no, line in enumerate(_lines(f), start=1):
            if line is _TOO_LONG:
                yield line_no, b"", _Reject(f"line longer than {MAX_LINE_BYTES} bytes"), "jsonl"
                continue
            if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # UTF-8 byte-order mark written by some editors
            if not line.strip():
                continue
            try:
                line.decode("utf-8")  # decoded here, not by orjson, for a precise reason
            except UnicodeDecodeError as e:
                yield line_no, line, _Reject(f"invalid UTF-8 at byte {e.start}"), "jsonl"
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                yield line_no, line, _Reject(f"malformed JSON: {e}"), "jsonl"
                continue
            fmt: SourceFormat = "openai" if isinstance(obj, dict) and "custom_id" in obj else "jsonl"
            yield line_no, line, obj if isinstance(obj, dict) else _Reject("not a JSON object"), fmt
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        what = getattr(e, "strerror", None) or e
        raise InputError(f"{name}: error while reading input after line {line_no}: {what}") from None
    finally:
        if close:
            f.close()
            if owner is not None:
                owner.close()


_TOO_LONG = b"\0too-long\0"  # sentinel object, compared by identity


def _lines(f: IO[bytes]) -> Iterator[bytes]:
    """Lines of a binary stream, each capped at MAX_LINE_BYTES (the rest is skipped, not stored)."""
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if isinstance(line, str):  # a text-mode stdin stand-in: already decoded
            line = line.encode("utf-8", "surrogateescape")
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while True:  # drain the rest of the oversize line in bounded chunks
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n" if isinstance(rest, bytes) else "\n"):
                    break
            yield _TOO_LONG
            continue
        yield line


def _excerpt(raw: bytes | dict[str, Any]) -> str:
    """Made only for rejected rows: good rows never pay for it."""
    if isinstance(raw, dict):
        return orjson.dumps(raw, default=str).decode()[:EXCERPT_CHARS]
    return raw[: EXCERPT_CHARS * 4].decode("utf-8", "backslashreplace").rstrip("\r\n")[:EXCERPT_CHARS]


def _parquet_records(f: IO[bytes], name: str, prompt_field: str, id_field: str) -> Iterator[_Record]:
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        f.close()
        raise InputError(f"{name} is not a readable Parquet file: {e}") from None
    cols = pf.schema_arrow.names
    if prompt_field not in cols and "messages" not in cols:
        f.close()
        raise InputError(
            f"{name} has no {prompt_field!r} or 'messages' column (columns: {', '.join(cols)}); "
            "map one with --prompt-field"
        )
    consumed = (prompt_field, "messages", id_field, *OVERRIDE_FIELDS, *UNSUPPORTED)
    return _ParquetRecords(_parquet_rows(pf, f, name, cols), passthrough_fields(pf.schema_arrow, consumed))


class _ParquetRecords:
    """A Parquet source's records, and its pass-through columns (`extra_fields`)."""

    def __init__(self, records: Iterator[_Record], extra_fields: list[pa.Field]):
        self._records = records
        self.extra_fields = extra_fields

    def __iter__(self) -> _ParquetRecords:
        return self

    def __next__(self) -> _Record:
        return next(self._records)

    def close(self) -> None:
        self._records.close()


def _parquet_rows(pf: pq.ParquetFile, f: IO[bytes], name: str, columns: list[str]) -> Iterator[_Record]:
    row_no = 0
    try:
        # Column projection + record batches: memory is one batch of the needed columns only.
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for raw, row in _batch_rows(batch):
                row_no += 1
                yield row_no, raw, row, "parquet"
    except (pa.ArrowException, OSError, ValueError) as e:  # a corrupt page, a truncated file
        raise InputError(f"{name}: cannot read row {row_no + 1}: {e}") from None
    finally:
        f.close()


def _batch_rows(batch: pa.RecordBatch) -> Iterator[tuple[dict[str, Any], dict[str, Any] | _Reject]]:
    """The rows of a record batch as (raw, parsed) dicts; a row whose values cannot be converted (e.g. invalid
    UTF-8 in a string column: Arrow checks it only on conversion) becomes a `_Reject`, and the
    other rows of its batch are kept."""
    try:
        rows = batch.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException):
        rows = None
    if rows is not None:
        for row in rows:
            yield row, row
        return
    for i in range(batch.num_rows):  # the slow path, for a batch holding a bad value only
        one = batch.slice(i, 1)
        row: dict[str, Any] = {}
        bad: list[str] = []
        for col, values in zip(one.schema.names, one.columns, strict=True):
            try:
                row[col] = values.to_pylist()[0]
            except UnicodeDecodeError as e:
                bad.append(f"{col!r} holds invalid UTF-8 at byte {e.start}")
            except pa.ArrowException as e:
                bad.append(f"{col!r} cannot be read: {e}")
        yield row, (_Reject("; ".join(bad)) if bad else row)  # the excerpt shows the readable columns


# ---- validation ----------------------------------------------------------------------------------


def _validate(
    line_no: int,
    raw: bytes | dict[str, Any],
    obj: dict[str, Any] | _Reject,
    fmt: SourceFormat,
    prompt_field: str,
    id_field: str,
    seen: IdSet,
    repeats: _Repeats,
    typed: frozenset[str] = frozenset(),
) -> PromptRow | RejectedRow:
    if isinstance(obj, _Reject):
        return RejectedRow(line_no, None, obj.reason, _excerpt(raw))
    try:
        row_id, prompt, messages, overrides, metadata, columns = (
            _openai_row(obj) if fmt == "openai" else _plain_row(obj, prompt_field, id_field, typed)
        )
    except _Reject as r:
        return RejectedRow(line_no, r.row_id, r.reason, _excerpt(raw))
    if row_id is None:
        h = _content_hash(prompt, messages, overrides)
        k = repeats.count(h)
        row_id = f"h-{h}" if k == 0 else f"h-{h}-{k}"
    if not seen.add(row_id):
        return RejectedRow(line_no, row_id, "duplicate id", _excerpt(raw))
    return PromptRow(row_id, line_no, prompt, messages, overrides, fmt, metadata=metadata, columns=columns)


class _Repeats:
    """How many times each id-less content was seen before: compact for the first occurrence (an
    IdSet), a dict only for contents that repeat."""

    def __init__(self) -> None:
        self.first = IdSet()
        self.more: dict[str, int] = {}

    def count(self, h: str) -> int:
        """Occurrences of `h` before this one (and count this one)."""
        if self.first.add(h):
            return 0
        k = self.more.get(h, 1)
        self.more[h] = k + 1
        return k


_Parsed = tuple["str | None", "str | None", "list[dict[str, str]] | None", "dict[str, Any]",
                "dict[str, Any] | None", "dict[str, Any] | None"]


def _plain_row(obj: dict[str, Any], prompt_field: str, id_field: str, typed: frozenset[str] = frozenset()) -> _Parsed:
    row_id = _check_id(obj.get(id_field), id_field)
    try:
        prompt, messages = _check_prompt(obj.get(prompt_field), obj.get("messages"), prompt_field)
        overrides = _check_overrides({k: obj.get(k) for k in OVERRIDE_FIELDS})
        _check_unsupported(obj, "")
    except _Reject as r:
        raise _Reject(r.reason, row_id) from None
    used = {prompt_field, "messages", id_field, *OVERRIDE_FIELDS, *UNSUPPORTED}
    columns = {k: v for k, v in obj.items() if k in typed} if typed else None
    metadata = {k: v for k, v in obj.items() if k not in used and k not in typed} or None
    return row_id, prompt, messages, overrides, metadata, columns


def _openai_row(obj: dict[str, Any]) -> _Parsed:
    row_id = _check_id(obj.get("custom_id"), "custom_id")
    if row_id is None:
        raise _Reject("OpenAI batch line: 'custom_id' is null")
    body = obj.get("body")
    try:
        url = obj.get("url")
        if url is not None and url not in _OPENAI_URLS:
            raise _Reject(f"OpenAI batch line: url {_short(url)} is not supported (only {', '.join(_OPENAI_URLS)})")
        if not isinstance(body, dict):
            raise _Reject("OpenAI batch line: 'body' must be an object")
        prompt, messages = _check_prompt(body.get("prompt"), body.get("messages"), "body.prompt")
        _check_unsupported(body, "body.")
        known = {"prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "seed", "n", "stop",
                 "top_p", "top_k", "min_p", "metadata", *_OPENAI_IGNORED, *UNSUPPORTED}
        unknown = sorted(k for k in body if k not in known)
        if unknown:
            raise _Reject(f"OpenAI batch line: unknown request field(s) {', '.join('body.' + k for k in unknown)} "
                          "(not decoded as if absent)")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        overrides = _check_overrides({"max_new_tokens": max_tokens, **{k: body.get(k) for k in (
            "temperature", "seed", "n", "stop", "top_p", "top_k", "min_p")}})
        meta = body.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise _Reject("OpenAI batch line: 'body.metadata' must be an object")
    except _Reject as r:
        raise _Reject(r.reason, row_id) from None
    extra = {k: v for k, v in obj.items() if k not in ("custom_id", "method", "url", "body")}
    metadata = {**(meta or {}), **extra} or None
    return row_id, prompt, messages, overrides, metadata, None


def _check_unsupported(obj: dict[str, Any], prefix: str) -> None:
    """Reject a row that sets a sampling field the engine cannot honour to a non-neutral value."""
    for k, neutral in _NEUTRAL.items():
        v = obj.get(k)
        if v is not None and not any(_same(v, n) for n in neutral):
            raise _Reject(f"{prefix}{k} = {_short(v)} is not supported: the engine cannot honour it "
                          "(remove the field, or set it to its neutral value)")


def _same(v: Any, n: Any) -> bool:
    """v equals the neutral value n, booleans never standing in for numbers (True == 1 in Python)."""
    if isinstance(v, bool) or isinstance(n, bool):
        return v is n
    return v == n


def _short(v: Any) -> str:
    try:
        r = orjson.dumps(v, default=str).decode()
    except (TypeError, orjson.JSONEncodeError):
        r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _check_id(v: Any, name: str) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise _Reject(f"{name!r} must be a string or an integer, got {type(v).__name__}")
    s = str(v)
    if not s.strip():
        raise _Reject(f"{name!r} is empty")
    if "\x00" in s:
        raise _Reject(f"{name!r} holds a NUL character")
    return s


def _check_prompt(prompt: Any, messages: Any, prompt_name: str) -> tuple[str | None, list | None]:
    if prompt is not None and messages is not None:
        raise _Reject(f"both {prompt_name!r} and 'messages' given")
    if prompt is None and messages is None:
        raise _Reject(f"missing {prompt_name!r} or 'messages'")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise _Reject(f"{prompt_name!r} must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise _Reject(f"{prompt_name!r} is empty")
        return prompt, None
    if not isinstance(messages, list) or not messages:
        raise _Reject("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        if not ok or not m["role"]:
            raise _Reject(f"messages[{i}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})  # other keys are not used by the model
    if not any(m["content"].strip() for m in out):
        raise _Reject("'messages' has no content")
    return None, out


def _check_overrides(given: dict[str, Any]) -> dict[str, Any]:
    """Validate with DecodeParams itself, so per-row values obey exactly the CLI flags' rules."""
    ov = {k: v for k, v in given.items() if v is not None}
    if not ov:
        return ov
    try:
        # n > 1 needs a temperature, which a row without one takes from the run (the batcher
        # checks the combination): validate each field here, not the row's missing ones
        p = DecodeParams(**({"temperature": 1.0} if "temperature" not in ov else {}), **ov)
    except (ConfigError, TypeError) as e:
        raise _Reject(f"invalid override: {e}") from None
    for k in ("gamma", "temperature", "top_p", "min_p"):
        if k in ov:
            ov[k] = float(ov[k])  # 1 and 1.0 must give the same derived id and output type
    if "stop" in ov:
        ov["stop"] = list(p.stop)  # a string or a list: one normal form
    return ov


def _content_hash(prompt: str | None, messages: list | None, overrides: dict[str, Any]) -> str:
    content = {"prompt": prompt} if prompt is not None else {"messages": messages}
    canon = orjson.dumps({**content, "overrides": overrides}, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canon, digest_size=12).hexdigest()
