"""The output formats, and the two line encodings of an output row, both ways.

A run directory (io.rundir) or the `-o -` stream (io.jsonl_out) writes one of:

    parquet  `part-NNNNN.parquet` shards (io.schema.output_schema); not a line format
    jsonl    `part-NNNNN.jsonl` shards (or the stream): one JSON object per row
    openai   `part-NNNNN.jsonl` shards (or the stream): one OpenAI Batch API *output* line per row

`jsonl`: every output column, in io.schema's order (then the pass-through columns), with
`created_at` as ISO 8601 UTC (`...Z`) and `metadata` embedded as a JSON object (not a string; a
value that is not a JSON object stays a string). Pass-through values are made JSON-able:
timestamps, dates and times ISO 8601, bytes base64, decimals strings, durations seconds.

`openai`: the shape of a line of an OpenAI Batch API output file, so tools that read those read
ours:

    {"id": "batch_req_<hex>", "custom_id": <id>,
     "response": {"status_code": 200, "request_id": <hex>,
                  "body": {"id": "cmpl-<hex>", "object": "chat.completion" | "text_completion",
                           "created": <unix s>, "model": <model>,
                           "choices": [<one choice>],
                           "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}},
     "error": null,
     "twotower": {every other output column}}

with the choice `{"index": <sample_index>, "message": {"role": "assistant", "content": <completion>},
"finish_reason": ...}` for a chat row (the prompt came as `messages`) or `{"index": <sample_index>,
"text": <completion>, "logprobs": null, "finish_reason": ...}` otherwise; finish_reason "stop" for
our "eos" and "stop", "length" for "length" (any other value as it is, null as null).

Samples: a run with n samples per prompt writes each sample as its own line, with the same
`custom_id` (the row's id) and the sample's `sample_index` as `choices[0].index` (the OpenAI API
would put the n choices of a request in one line; one line per (id, sample_index) keeps every
line the unit of commit, resume and exactly-once). Join the lines of one request on `custom_id`.

`twotower` holds every column that the OpenAI fields do not hold exactly: all but id,
sample_index, completion, chat, model, prompt_tokens and completion_tokens (so also
`finish_reason`, which the choice maps, and `created_at`, which `created` rounds to seconds). The
three hex ids are blake2b digests of the row key (io.schema.sample_key): the same row always gives
the same line.

`record_from_line` is the inverse of `encode_line`: it gives back the record (as
io.schema.check_record returns it) that the Parquet shard would hold, so a resume and `twotower
stats` read JSONL and OpenAI shards like Parquet ones. Known losses: a NaN or infinite float in a
pass-through column becomes null (JSON has no NaN), and a `metadata` string that is a JSON object
in a non-compact spelling comes back compact (the same object).
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

import orjson
import pyarrow as pa

from .schema import COLUMN_NAMES, COLUMNS, check_record, sample_key

OutputFormat = Literal["parquet", "jsonl", "openai"]
FORMATS: tuple[str, ...] = ("parquet", "jsonl", "openai")
LINE_FORMATS: tuple[str, ...] = ("jsonl", "openai")

# The columns an OpenAI line holds outside `twotower` (exactly: nothing is lost there).
_OPENAI_BODY_COLUMNS = ("id", "sample_index", "completion", "chat", "model", "prompt_tokens", "completion_tokens")
OPENAI_EXTRA_COLUMNS = tuple(c for c in COLUMN_NAMES if c not in _OPENAI_BODY_COLUMNS)
_FINISH_TO_OPENAI = {"eos": "stop", "stop": "stop", "length": "length"}
_REQUIRED = tuple(name for name, _, nullable in COLUMNS if not nullable)


def check_format(fmt: str) -> str:
    """`fmt` if it is an output format; ValueError (one line) otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def shard_ext(fmt: str) -> str:
    """The extension of a committed shard of format `fmt`: parquet, or jsonl (jsonl and openai)."""
    return "parquet" if check_format(fmt) == "parquet" else "jsonl"


# ---- encoding --------------------------------------------------------------------------------------


def encode_line(record: dict[str, Any], fmt: str) -> bytes:
    """One output line (with its newline) for a record as io.schema.check_record returns it.
    Raises ValueError when a pass-through value cannot be made JSON."""
    if fmt == "jsonl":
        obj: dict[str, Any] = dict(record)
        obj["metadata"] = _metadata_out(record.get("metadata"))
    elif fmt == "openai":
        obj = openai_line(record)
    else:
        raise ValueError(f"{fmt!r} is not a line format")
    try:
        return orjson.dumps(obj, default=_jsonable, option=orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE)
    except TypeError as e:  # orjson.JSONEncodeError: a value of a type with no JSON spelling
        raise ValueError(f"row {record.get('id')!r} cannot be written as JSON: {e}") from None


def openai_line(record: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI Batch API output object of one record (see the module docstring)."""
    row_id, k = record["id"], record.get("sample_index") or 0
    key = sample_key(row_id, k)
    chat = bool(record.get("chat"))
    finish = record.get("finish_reason")
    finish = _FINISH_TO_OPENAI.get(finish, finish)
    if chat:
        choice = {"index": k, "message": {"role": "assistant", "content": record["completion"]},
                  "finish_reason": finish}
    else:
        choice = {"index": k, "text": record["completion"], "logprobs": None, "finish_reason": finish}
    pt, ct = record.get("prompt_tokens"), record.get("completion_tokens")
    created_at = record.get("created_at")
    rest = {c: v for c, v in record.items() if c not in _OPENAI_BODY_COLUMNS}
    rest["metadata"] = _metadata_out(record.get("metadata"))
    return {
        "id": "batch_req_" + _hex(key, b"batch_req"),
        "custom_id": row_id,
        "response": {
            "status_code": 200,
            "request_id": _hex(key, b"request"),
            "body": {
                "id": "cmpl-" + _hex(key, b"cmpl"),
                "object": "chat.completion" if chat else "text_completion",
                "created": int(created_at.timestamp()) if isinstance(created_at, datetime) else None,
                "model": record.get("model"),
                "choices": [choice],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct,
                          "total_tokens": pt + ct if pt is not None and ct is not None else None},
            },
        },
        "error": None,
        "twotower": rest,
    }


def _hex(key: str, what: bytes) -> str:
    """32 hex digits, a function of the row key only (one digest per kind of id)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16, person=b"tt-" + what[:13]).hexdigest()


def _metadata_out(v: Any) -> Any:
    """The `metadata` column as it goes into a line: its JSON object, or the string if it holds none."""
    if isinstance(v, str):
        try:
            obj = orjson.loads(v)
        except orjson.JSONDecodeError:
            return v
        if isinstance(obj, dict):
            return obj
    return v


def _jsonable(v: Any) -> Any:
    """orjson's `default`: the pass-through values JSON has no type for."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, timedelta):
        return v.total_seconds()
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    raise TypeError(f"type {type(v).__name__} is not JSON serializable")


# ---- decoding --------------------------------------------------------------------------------------


def record_from_line(line: bytes | str, fmt: str, extra: Sequence[pa.Field] = ()) -> dict[str, Any]:
    """The record a line of format `fmt` holds, exactly as its Parquet twin's row reads
    (`pq.read_table(...).to_pylist()`: every column in order, then the pass-through columns
    `extra`, typed). Strict: a missing or unknown column, a wrong type or a malformed line raises
    ValueError naming what is wrong."""
    flat = flat_fields(_parse(line), fmt)
    expected = [*COLUMN_NAMES, *(f.name for f in extra)]
    if set(flat) != set(expected):
        missing = [c for c in expected if c not in flat]
        unknown = sorted(set(flat) - set(expected))
        raise ValueError("; ".join(x for x in (f"missing column(s) {missing}" if missing else "",
                                               f"unknown column(s) {unknown}" if unknown else "") if x))
    rec = {c: _column(c, flat[c]) for c in COLUMN_NAMES}
    for name in _REQUIRED:
        if rec[name] is None:  # check_record would fill a default in
            raise ValueError(f"output column {name!r} is required")
    for f in extra:
        d = decoder(f.type)
        rec[f.name] = flat[f.name] if d is None else d(flat[f.name])
    return check_record(rec, extra)


def columns_from_line(line: bytes | str, fmt: str, columns: Iterable[str]) -> dict[str, Any]:
    """Only the output columns `columns` of a line (absent: None), typed; for `twotower stats`,
    which does not know a run's pass-through columns and needs only a few columns."""
    flat = flat_fields(_parse(line), fmt)
    return {c: _column(c, flat.get(c)) for c in columns}


def line_key(line: bytes | str, fmt: str) -> str:
    """The row key (io.schema.sample_key) of a line, without decoding the rest of it."""
    obj = _parse(line)
    try:
        if fmt == "openai":
            return sample_key(obj["custom_id"], obj["response"]["body"]["choices"][0]["index"])
        return sample_key(obj["id"], obj["sample_index"])
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a {fmt} output line: no {e}") from None


def sniff_format(line: bytes | str) -> str:
    """`openai` for a line with the OpenAI Batch API output shape, else `jsonl`."""
    obj = _parse(line)
    return "openai" if "custom_id" in obj and isinstance(obj.get("response"), dict) else "jsonl"


def _parse(line: bytes | str) -> dict[str, Any]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def flat_fields(obj: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A parsed line as {column: JSON value} (nothing typed yet: see _column)."""
    if fmt == "jsonl":
        if "id" not in obj:  # e.g. an openai line read as jsonl: never a row of nulls
            raise ValueError("not a jsonl output line: no id")
        return obj
    if fmt == "openai":
        return _openai_fields(obj)
    raise ValueError(f"{fmt!r} is not a line format")


def _column(name: str, v: Any) -> Any:
    """The JSON value of output column `name` as its record value (`metadata` back to a string)."""
    if v is None:
        return None
    if name == "metadata":
        return v if isinstance(v, str) else orjson.dumps(v).decode()
    d = _COLUMN_DECODERS[name]
    return v if d is None else d(v)


def _openai_fields(obj: dict[str, Any]) -> dict[str, Any]:
    def need(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(d, dict) or key not in d or not isinstance(d[key], typ):
            raise ValueError(f"not an openai output line: {where}{key} is missing or not a {_tname(typ)}")
        return d[key]

    resp = need(obj, "response", dict, "")
    body = need(resp, "body", dict, "response.")
    choices = need(body, "choices", list, "response.body.")
    if len(choices) != 1:
        raise ValueError(f"not a twotower openai line: {len(choices)} choices (one sample per line)")
    choice = choices[0]
    kind = body.get("object")
    if kind not in ("chat.completion", "text_completion"):
        raise ValueError(f"not an openai output line: response.body.object is {kind!r}")
    chat = kind == "chat.completion"
    if chat:
        completion = need(need(choice, "message", dict, "choices[0]."), "content", str, "choices[0].message.")
    else:
        completion = need(choice, "text", str, "choices[0].")
    usage = body.get("usage") or {}
    if not isinstance(usage, dict):
        raise ValueError("not an openai output line: response.body.usage is not an object")
    rest = need(obj, "twotower", dict, "")
    taken = sorted(set(rest) & set(_OPENAI_BODY_COLUMNS))
    if taken:
        raise ValueError(f"twotower holds column(s) {taken} that the OpenAI fields hold")
    flat = {
        "id": need(obj, "custom_id", str, ""),
        "sample_index": need(choice, "index", int, "choices[0]."),
        "completion": completion,
        "chat": chat,
        "model": body.get("model"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        **rest,
    }
    if "created_at" not in flat and isinstance(body.get("created"), int):  # an OpenAI line of another origin
        flat["created_at"] = datetime.fromtimestamp(body["created"], timezone.utc).isoformat()
    return flat


def _tname(typ: type | tuple[type, ...]) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer"}.get(typ, str(typ))  # type: ignore[call-overload]


Decoder = Callable[[Any], Any]


@functools.lru_cache(maxsize=512)
def decoder(typ: pa.DataType) -> Decoder | None:
    """The function that turns a JSON value back into the Python value Arrow gives for type `typ`
    (the inverse of _jsonable and of orjson's spellings), None where the JSON value is that value
    already. Built once per type (a resume decodes every line of every shard). A decoder maps None
    to None and raises ValueError for a value that cannot be one of `typ`."""
    inner = _decoder(typ)
    if inner is None:
        return None

    def decode(v: Any) -> Any:
        if v is None:
            return None
        try:
            return inner(v)
        except (TypeError, ValueError, ArithmeticError, AttributeError) as e:
            raise ValueError(f"{v!r} is not a {typ}: {e}") from None

    return decode


def _decoder(typ: pa.DataType) -> Decoder | None:
    t = pa.types
    if t.is_timestamp(typ):
        tz = typ.tz

        def timestamp(v: Any) -> datetime:
            if not isinstance(v, str):
                raise ValueError("not an ISO 8601 string")
            ts = datetime.fromisoformat(v)
            return ts.replace(tzinfo=timezone.utc) if tz is not None and ts.tzinfo is None else ts

        return timestamp
    if t.is_date(typ):
        return date.fromisoformat
    if t.is_time(typ):
        return time.fromisoformat
    if t.is_duration(typ):
        return lambda v: timedelta(seconds=v)
    if t.is_binary(typ) or t.is_large_binary(typ) or t.is_fixed_size_binary(typ):
        return lambda v: base64.b64decode(v, validate=True)
    if t.is_decimal(typ):
        return lambda v: Decimal(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else Decimal(str(v))
    if t.is_floating(typ):
        return lambda v: float(v) if type(v) is int else v
    if t.is_list(typ) or t.is_large_list(typ) or t.is_fixed_size_list(typ):
        d = decoder(typ.value_type)
        return None if d is None else (lambda v: [d(x) for x in v])
    if t.is_map(typ):
        kd = decoder(typ.key_type) or _same
        vd = decoder(typ.item_type) or _same
        return lambda v: [(kd(k), vd(x)) for k, x in v]
    if t.is_struct(typ):
        fields = [(f.name, decoder(f.type) or _same) for f in typ]

        def struct(v: Any) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise ValueError("not an object")
            return {name: d(v.get(name)) for name, d in fields}

        return struct
    if t.is_dictionary(typ):
        return decoder(typ.value_type)
    return None


def _same(v: Any) -> Any:
    return v


_COLUMN_DECODERS: dict[str, Decoder | None] = {name: decoder(t) for name, t, _ in COLUMNS}
