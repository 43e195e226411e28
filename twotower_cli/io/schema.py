"""The types that cross the I/O boundary: input rows, rejected rows and the output Parquet schema.

They live in one small module so that every stage (reader, batcher, writer, `twotower stats`) agrees
on them without importing each other. The output schema is spelled out column by column with fixed
Arrow types so that shard N written today and shard N+1 written after a resume next week are
byte-compatible for pyarrow.dataset, duckdb, polars and Hugging Face datasets (they all refuse or
silently up-cast mismatched shard schemas).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import orjson
import pyarrow as pa

from ..errors import UserError

# Bump when a column is added, removed or changes type; readers compare it before mixing shards.
SCHEMA_VERSION = "3"  # 2: speculative's accepted_per_round, the AR score; 3: samples, filters, repetition, pass-through
META_SCHEMA_VERSION = "twotower.schema_version"
META_FINGERPRINT = "twotower.fingerprint"

SourceFormat = Literal["jsonl", "openai", "parquet"]


class InputError(UserError):
    """The input as a whole cannot be read (missing file, not Parquet, no prompt column).

    Distinct from `RejectedRow`: one bad row never stops a run, an unreadable source does (exit 2).
    """


@dataclass(frozen=True, slots=True)
class PromptRow:
    """One valid prompt. Exactly one of `prompt` / `messages` is set.

    `overrides` holds only the per-row decoding fields that were given (validated and normalised:
    gamma/temperature as float), so the pipeline can do `defaults.replace(**row.overrides)`.
    `line_no` is the 1-based physical line for JSONL/stdin and the 1-based row for Parquet.
    Pass-through (not decoding settings, not hashed into `input_hash`): `metadata` the input's other
    fields as a JSON object (JSONL, OpenAI lines; Parquet columns that cannot keep their own
    column), `columns` a Parquet input's other columns by name, typed (io.schema: extra fields).
    """

    id: str
    line_no: int
    prompt: str | None
    messages: list[dict[str, str]] | None
    overrides: dict[str, Any] = field(default_factory=dict)
    source_format: SourceFormat = "jsonl"
    metadata: dict[str, Any] | None = None
    columns: dict[str, Any] | None = None
    samples: tuple[int, ...] = (0,)  # the sample indices to decode (the run loop drops those done)

    def prompt_text(self) -> str:
        """The `prompt` column value: the text, or the chat messages as compact JSON."""
        if self.prompt is not None:
            return self.prompt
        return orjson.dumps(self.messages).decode()


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A row that will not be generated, and why. Produced by the reader and later by the batcher.

    `reason` must be deterministic for a given input row: `ErrorLog` deduplicates on
    (line_no, reason) so that a row re-read on resume is not logged twice.
    """

    line_no: int
    id: str | None
    reason: str
    raw: str = ""  # an excerpt of the offending input, for humans

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- output ------------------------------------------------------------------------------------

_STR, _F64, _I64, _BOOL = pa.string(), pa.float64(), pa.int64(), pa.bool_()
_TS = pa.timestamp("us", tz="UTC")

# The per-row statistics: the engine's `Stats` (engine.request) has an attribute of each name, and
# the pipeline copies them into the record by name. (name, type, nullable): nullable because a
# mode may not define one (AR has no γ in effect) and because "unknown" must not be faked as 0.
_STATS: list[tuple[str, pa.DataType, bool]] = [
    ("mode", _STR, True),
    ("gamma", _F64, True),
    ("block_size", _I64, True),
    ("steps_per_block", _I64, True),
    ("temperature", _F64, True),
    ("seed", _I64, True),  # the sample's own seed (pipeline.sample_seed): rerun alone, it gives this row
    ("top_k", _I64, True),
    ("top_p", _F64, True),
    ("min_p", _F64, True),
    ("prompt_tokens", _I64, True),
    ("completion_tokens", _I64, True),
    ("denoiser_steps", _I64, True),
    ("context_forwards", _I64, True),
    ("tokens_per_step", _F64, True),
    ("blocks", _I64, True),
    ("finish_reason", _STR, True),
    ("latency_s", _F64, True),
    ("accepted_per_round", _F64, True),  # speculative rows only: tokens committed per verify
    ("ar_logprob", _F64, True),  # the context tower's log p of the completion (null: not scored)
    ("ar_agreement", _F64, True),  # share of the completion's tokens that are its greedy choice
]
STATS_COLUMNS = tuple(name for name, _, _ in _STATS)
# Every output column, in order: the row, its completion, its statistics, and where it came from.
COLUMNS: list[tuple[str, pa.DataType, bool]] = [
    ("id", _STR, False),
    ("sample_index", _I64, False),  # 0 .. n-1: the row's samples; (id, sample_index) is the row's key
    ("prompt", _STR, False),
    ("chat", _BOOL, False),  # the prompt came as chat `messages` (`prompt` holds them as JSON)
    ("completion", _STR, False),
    *_STATS,
    ("repetition", _F64, True),  # share of the completion covered by its most repeated n-gram (quality.py)
    ("model", _STR, True),
    # blake2b-64 (16 hex) of the row's input: prompt/messages and its decoding settings, not its id
    # (pipeline.input_hash); a resume compares it to find rows whose input changed under their id
    ("input_hash", _STR, True),
    # the input's other fields as a JSON object (null: none), so outputs join back to their sources
    ("metadata", _STR, True),
    ("created_at", _TS, False),
]
# A Parquet input's other columns follow these, each with its own name and type (`extra` below).
COLUMN_NAMES = [c[0] for c in COLUMNS]
_COLUMN_TYPES = {name: t for name, t, _ in COLUMNS}
INT64_MAX = 2**63 - 1


def output_schema(metadata: dict[str, str] | None = None, extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """The shard schema, with the schema version (and any extra metadata) in key-value metadata.
    `extra`: pass-through columns of a Parquet input (nullable, after the fixed columns)."""
    meta = {META_SCHEMA_VERSION: SCHEMA_VERSION, **(metadata or {})}
    fields = [pa.field(n, t, nullable=nn) for n, t, nn in COLUMNS]
    fields += [pa.field(f.name, f.type, nullable=True) for f in extra]
    return pa.schema(fields, metadata=meta)


def passthrough_fields(schema: pa.Schema, consumed: Sequence[str]) -> list[pa.Field]:
    """The columns of an input Parquet schema that pass through to the output as typed columns:
    every column not `consumed` (prompt, id, decoding settings) whose name is not an output column
    (those go into `metadata` instead, io.reader)."""
    taken = set(consumed) | set(COLUMN_NAMES)
    return [f for f in schema if f.name not in taken]


def describe_fields(extra: Sequence[pa.Field]) -> list[list[str]]:
    """The pass-through columns as [name, type] pairs (the run fingerprint: a resume must write the
    same shard schema)."""
    return [[f.name, str(f.type)] for f in extra]


def check_record(record: dict[str, Any], extra: Sequence[pa.Field] = ()) -> dict[str, Any]:
    """Validate one output record and return it normalised, or raise ValueError naming the column.

    Checked at `add()` time, not when a row group is flushed, so a bad record is reported against
    the row that produced it instead of failing a whole buffered row group later. Missing optional
    columns become null; `created_at` defaults to now (UTC); unknown keys are an error (a typo
    would otherwise silently drop a statistic). `extra` are the pass-through columns (checked by
    Arrow against their type).
    """
    extra_types = {f.name: f.type for f in extra}
    unknown = set(record) - set(_COLUMN_TYPES) - set(extra_types)
    if unknown:
        raise ValueError(f"unknown output column(s) {sorted(unknown)}")
    out: dict[str, Any] = {}
    for name, typ, nullable in COLUMNS:
        v = record.get(name)
        if v is None:
            if name == "created_at":
                v = datetime.now(timezone.utc)
            elif name == "sample_index":
                v = 0
            elif name == "chat":
                v = False
            elif not nullable:
                raise ValueError(f"output column {name!r} is required")
            out[name] = v
            continue
        out[name] = _check_value(name, typ, v)
    for name, typ in extra_types.items():
        v = record.get(name)
        if v is not None:
            try:
                pa.array([v], type=typ)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
                raise ValueError(f"column {name!r} cannot hold {v!r} as {typ}: {e}") from None
        out[name] = v
    return out


def _check_value(name: str, typ: pa.DataType, v: Any) -> Any:
    if typ == _BOOL:
        if not isinstance(v, bool):
            raise ValueError(f"column {name!r} must be a boolean, got {type(v).__name__}")
        return v
    if typ == _STR:
        if not isinstance(v, str):
            raise ValueError(f"column {name!r} must be a string, got {type(v).__name__}")
        return v
    if typ == _I64:
        if isinstance(v, bool) or not isinstance(v, int) or not -INT64_MAX - 1 <= v <= INT64_MAX:
            raise ValueError(f"column {name!r} must be a 64-bit integer, got {v!r}")
        return v
    if typ == _F64:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"column {name!r} must be a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):  # "unknown" is null, never NaN: NaN breaks sums in every engine
            raise ValueError(f"column {name!r} must be finite, got {v!r}")
        return v
    if typ == _TS:
        if not isinstance(v, datetime) or v.tzinfo is None:
            raise ValueError(f"column {name!r} must be a timezone-aware datetime, got {v!r}")
        return v.astimezone(timezone.utc)
    raise AssertionError(f"no check for {typ}")  # pragma: no cover


def sample_key(row_id: str, sample_index: int = 0) -> str:
    """The key of one output row (its done-set entry): the id for sample 0, so a run without
    samples keys rows as before, and `id + NUL + k` for sample k >= 1. Unambiguous because ids never
    hold a NUL character (io.reader rejects them)."""
    return row_id if not sample_index else f"{row_id}\x00{sample_index}"
