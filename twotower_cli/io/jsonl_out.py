"""`twotower gen -o -`: finished rows as JSON lines on a binary stream (stdout), one flush per row.

The same interface as `io.rundir.RunDir` for the run loop (add, reject, is_done, close, ...), so
the loop is the same; but nothing is resumable: no lock, no manifest, no done set from earlier
runs. `format` "jsonl": each line is one output record with exactly the Parquet columns
(io.schema.COLUMNS, then the pass-through columns), in that order, `created_at` as an RFC 3339
UTC timestamp, `metadata` as a JSON object; "openai": one OpenAI Batch API output line per row
(io.formats has both encodings). Rows come in completion order, keyed by (id, sample_index)
(io.schema.sample_key). Rejected
rows are not on the stream (it holds rows only): the run loop counts them and `gen` reports them
on stderr. When the reader of the stream goes away (`| head`), `add` returns False and the stream
is pointed at /dev/null, so nothing more fails and the exit stays quiet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from .formats import LINE_FORMATS, encode_line
from .schema import PromptRow, RejectedRow, check_record, sample_key
from .writer import describe_key


class JsonlSink:
    def __init__(self, stream: IO[bytes], on_reject: Any = None, *, format: str = "jsonl",  # noqa: A002
                 extra_fields: Sequence[pa.Field] = ()):
        if format not in LINE_FORMATS:
            raise ValueError(f"the output stream writes {' or '.join(LINE_FORMATS)}, not {format!r}")
        self.stream = stream
        self.on_reject = on_reject  # called with each RejectedRow (gen prints it on stderr)
        self.format = format
        self.extra_fields = list(extra_fields)
        self.notes: list[str] = []
        self.keys: set[str] = set()  # the row keys written
        self.rejected: list[RejectedRow] = []
        self.rejected_again: list[PromptRow] = []
        self.closed = False  # the reader went away

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_done(self, key: str) -> bool:
        """Written by this run (a decoder that may deliver a row twice drops the second copy).
        `key`: io.schema.sample_key(id, sample_index)."""
        return key in self.keys

    def was_rejected(self, row: PromptRow) -> bool:
        return False

    def add(self, record: dict[str, Any]) -> bool:
        """Write one row and flush it. False when the stream's reader has gone away."""
        if self.closed:
            return False
        rec = check_record(record, self.extra_fields)
        key = sample_key(rec["id"], rec["sample_index"])
        if key in self.keys:
            raise ValueError(f"{describe_key(key)} written twice")
        line = encode_line(rec, self.format)
        try:
            self.stream.write(line)
            self.stream.flush()
        except BrokenPipeError:
            self._gone()
            return False
        self.keys.add(key)
        return True

    def _gone(self) -> None:
        self.closed = True
        try:  # later writes (and the interpreter's flush at exit) go nowhere instead of failing
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def reject(self, row: RejectedRow) -> None:
        self.rejected.append(row) if self.on_reject is None else self.on_reject(row)

    def note_phase(self, phase: str) -> None:
        return None

    def sync_rejects(self) -> None:
        return None

    def checkpoint(self) -> None:
        return None

    @property
    def errors_path(self) -> Path | None:
        return None

    @property
    def rows_committed(self) -> int:
        return len(self.keys)

    def close(self, complete: bool = False) -> None:
        if self.closed:
            return
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._gone()
        except (OSError, ValueError):
            pass
