"""`twotower gen -o -`: finished rows as JSON lines on a binary stream (stdout), one flush per row.

The same interface as `io.rundir.RunDir` for the run loop (add, reject, is_done, close, ...), so
the loop is the same; but nothing is resumable: no lock, no manifest, no done set from earlier
runs. Each line is one output record with exactly the Parquet columns (io.schema.COLUMNS), in
that order, `created_at` as an RFC 3339 UTC timestamp; rows come in completion order. Rejected
rows are not on the stream (it holds rows only): the run loop counts them and `gen` reports them
on stderr. When the reader of the stream goes away (`| head`), `add` returns False and the stream
is pointed at /dev/null, so nothing more fails and the exit stays quiet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import orjson

from .schema import PromptRow, RejectedRow, check_record


class JsonlSink:
    def __init__(self, stream: IO[bytes], on_reject: Any = None):
        self.stream = stream
        self.on_reject = on_reject  # called with each RejectedRow (gen prints it on stderr)
        self.notes: list[str] = []
        self.ids: set[str] = set()
        self.rejected: list[RejectedRow] = []
        self.rejected_again: list[PromptRow] = []
        self.closed = False  # the reader went away

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_done(self, row_id: str) -> bool:
        """Written by this run (a decoder that may deliver a row twice drops the second copy)."""
        return row_id in self.ids

    def was_rejected(self, row: PromptRow) -> bool:
        return False

    def add(self, record: dict[str, Any]) -> bool:
        """Write one row and flush it. False when the stream's reader has gone away."""
        if self.closed:
            return False
        rec = check_record(record)
        if rec["id"] in self.ids:
            raise ValueError(f"id {rec['id']!r} written twice")
        line = orjson.dumps(rec, option=orjson.OPT_UTC_Z) + b"\n"
        try:
            self.stream.write(line)
            self.stream.flush()
        except BrokenPipeError:
            self._gone()
            return False
        self.ids.add(rec["id"])
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
        return len(self.ids)

    def close(self, complete: bool = False) -> None:
        if self.closed:
            return
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._gone()
        except (OSError, ValueError):
            pass
