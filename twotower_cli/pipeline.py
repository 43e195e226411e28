"""The run loop: reader -> filters -> a decoder -> RunDir, in one visible place; plus resume and signals.

Each stage has one owner: `io.reader` turns input lines into rows, a `Decoder` turns rows into
finished output records, `io.rundir.RunDir` commits shards. This module owns the one loop that
connects them, for a local run and a Ray run alike (`generate`):

    read_rows -> partition filter -> done filter (resume) -> decoder.decode -> RunDir (+ errors)

The loop skips rows of other partition tasks and rows already done, logs the reader's rejects,
stops taking input on a signal, commits what the decoder delivers (and the decoder's own rejects),
commits the open shard every `commit_every_s`, reports progress and builds the summary:

    first SIGINT / SIGTERM   take no new rows, finish the rows in flight, commit, exit 3
    second signal            stop at once, commit the rows already finished, exit 3

Rows not committed are simply not done: the next run of the same command does them.

Decoders. `LocalDecoder` (here) is Batcher + Engine in this process; `ray_pipeline.RayDecoder`
ships the rows to Ray actors and yields their records back. A decoder gets the admitted rows and
the run's `Signals` and yields `Decoded` records and `RejectedRow`s; it decides how far a signal
reaches into its own work (the engine's steps, Ray's next batch) and may add to the summary.

A partitioned run (`cfg.partition`, one task of a job array) reads the whole input and keeps the
rows whose id hashes to its shard (io.partition); everything else is the same.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import errors
from .batcher import Batcher, BatchPolicy
from .config import DecodeParams
from .engine import Engine, Request, Result
from .io.partition import Partition
from .io.reader import read_rows
from .io.rundir import RunDir
from .io.schema import SCHEMA_VERSION, STATS_COLUMNS, PromptRow, RejectedRow

EXIT_INTERRUPTED = errors.EXIT_INTERRUPTED  # aliases: commands import them from here
EXIT_REJECTS = errors.EXIT_REJECTS


@dataclass
class RunConfig:
    source: str
    out_dir: Path
    model: Any  # a loaded TwoTower
    tokenizer: Any
    model_name: str
    model_fingerprint: str
    defaults: DecodeParams = field(default_factory=DecodeParams)
    max_batch_rows: int = 32
    max_batch_tokens: int = 16384
    rows_per_shard: int = 10_000
    commit_every_s: float = 300.0  # bound the work a crash can cost: commit the open shard this often
    prompt_field: str = "prompt"
    id_field: str = "id"
    limit: int | None = None
    overwrite: bool = False
    window: int = 2048
    partition: Partition | None = None  # one task of a job array: only the rows of this shard
    ar_score: bool | None = None  # the AR score of each row: True all, False none, None AR/speculative rows


@dataclass
class Progress:
    """Live counters, read by the progress display."""

    rows: int = 0
    skipped: int = 0
    rejected: int = 0
    other_shards: int = 0  # rows of other tasks of a partitioned run (not this task's to do)
    tokens: int = 0
    steps: int = 0  # denoiser steps of diffusion / mock-AR rows, decode forwards of AR rows
    started: float = field(default_factory=time.perf_counter)
    stopping: int = 0  # signals received


def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What a resume must share with the run it continues."""
    return {"model": cfg.model_name, "checkpoint": cfg.model_fingerprint, "schema": SCHEMA_VERSION,
            "decode": asdict(cfg.defaults)}


class Signals:
    """SIGINT/SIGTERM count in `progress.stopping` instead of raising, while the run is in progress.

    `stopping` (signals so far): 1 means take no new rows, 2 or more stop at once. Inside
    `interruptible()` a second signal also raises KeyboardInterrupt, to cut a blocking wait short
    (never use it around a write); the loop treats that as the second signal.
    """

    def __init__(self, progress: Progress):
        self.progress = progress
        self.saved: dict[int, Any] = {}
        self._blocked = False

    @property
    def stopping(self) -> int:
        return self.progress.stopping

    @property
    def now(self) -> bool:
        """Stop at once (a second signal)."""
        return self.progress.stopping > 1

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self._blocked = True
        try:
            yield
        finally:
            self._blocked = False

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.saved[s] = signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.progress.stopping += 1
        if self.progress.stopping > 1 and self._blocked:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for s, h in self.saved.items():
            signal.signal(s, h)


# ---- decoders -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decoded:
    """A finished row: its output record (io.schema columns) and its decoding steps (for progress)."""

    record: dict[str, Any]
    steps: int


class Decoder:
    """Rows in, finished records out. The base is the interface; `LocalDecoder` and
    `ray_pipeline.RayDecoder` implement it.

    Used as a context manager around the decoding (entered after the run directory is open and
    before the signal handlers are installed: a decoder may start what it needs there).
    `decode(rows, signals, is_done)` pulls the admitted rows (valid, this task's, not done: the
    iterator ends at the first signal) when it wants them, and yields `Decoded` records and the
    `RejectedRow`s it finds. Once `signals.stopping` it hands out no row it holds but has not
    started; it decides how soon it stops yielding (at once when `signals.now`, at the latest).
    Each record is committed before the next item is asked for. `is_done(id)`: already committed
    or written (a decoder that may deliver a row twice drops the second copy). After the run,
    `counters` holds the engine counters of the summary, `error` a failure that ends the run with
    exit 1 (the rows delivered are committed), and `summary()` the decoder's own summary entries.
    """

    counters: dict[str, int]
    error: str | None = None

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def decode(self, rows: Iterable[PromptRow], signals: Signals,
               is_done: Callable[[str], bool]) -> Iterator[Decoded | RejectedRow]:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        return {}


class LocalDecoder(Decoder):
    """Batcher (length order) + Engine in this process, on `cfg.model`."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        config = cfg.model.config
        self.batcher = Batcher(cfg.tokenizer, cfg.defaults, config.max_position_embeddings,
                               BatchPolicy(window=cfg.window), vocab_size=config.vocab_size)
        self.engine = Engine(cfg.model, max_batch_rows=cfg.max_batch_rows, max_batch_tokens=cfg.max_batch_tokens,
                             ar_score=cfg.ar_score)
        self.model_label = f"{cfg.model_name}@{cfg.model_fingerprint}"

    @property
    def counters(self) -> dict[str, int]:
        return self.engine.counters

    def decode(self, rows: Iterable[PromptRow], signals: Signals,
               is_done: Callable[[str], bool]) -> Iterator[Decoded | RejectedRow]:
        rejected: deque[RejectedRow] = deque()

        def requests() -> Iterator[Request]:
            for item in self.batcher(rows):
                if signals.stopping:
                    return  # take no new rows; the engine finishes those in flight
                if isinstance(item, RejectedRow):
                    rejected.append(item)  # delivered before the next result, in the order pulled
                    continue
                yield item

        for res in self.engine.run(requests(), stop=lambda: signals.now):
            while rejected:
                yield rejected.popleft()
            yield Decoded(output_record(res, self.cfg.tokenizer, self.cfg.model.config.eos_ids, self.model_label),
                          res.stats.steps)
            if signals.now:
                break  # a second signal: stop now; the loop has committed the rows finished
        while rejected:
            yield rejected.popleft()


def output_record(res: Result, tokenizer: Any, eos_ids: Iterable[int], model: str) -> dict[str, Any]:
    """The output record of a finished row (created_at is left to the writer: now)."""
    row: PromptRow = res.meta
    rec = {k: getattr(res.stats, k) for k in STATS_COLUMNS}
    tokens = res.tokens
    if tokens and tokens[-1] in set(eos_ids):
        tokens = tokens[:-1]  # the EOS ends the completion; it is not part of its text
    rec.update(id=res.id, prompt=row.prompt_text(), completion=tokenizer.decode(tokens, skip_special_tokens=True),
               model=model)
    return rec


# ---- the run loop ---------------------------------------------------------------------------------


def run(cfg: RunConfig, on_result: Callable[[Progress], None] | None = None,
        notes: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate every row of `cfg.source` not yet in `cfg.out_dir`, in this process. Returns the
    run summary."""
    return generate(cfg, LocalDecoder(cfg), on_result, notes)


def generate(cfg: RunConfig, decoder: Decoder, on_result: Callable[[Progress], None] | None = None,
             notes: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The one run loop: every row of `cfg.source` not yet in `cfg.out_dir`, decoded by `decoder`
    and committed here. Returns the run summary (plus the decoder's entries)."""
    prog = Progress()
    rows = read_rows(cfg.source, prompt_field=cfg.prompt_field, id_field=cfg.id_field, limit=cfg.limit)
    with RunDir(cfg.out_dir, fingerprint(cfg), overwrite=cfg.overwrite, rows_per_shard=cfg.rows_per_shard,
                partition=cfg.partition) as rd:
        for n in rd.notes:
            if notes:
                notes(n)
        try:
            with decoder, Signals(prog) as sig:  # after the decoder starts: our handlers are the ones installed
                todo = admit(rows, rd, cfg.partition, prog, sig)
                commit(decoder.decode(todo, sig, rd.is_done), rd, prog, cfg.commit_every_s, on_result)
        except KeyboardInterrupt:  # interruptible() cut a wait short, or a signal beat our handlers: stop now
            prog.stopping = max(prog.stopping, 2)
        if on_result:
            on_result(prog)
        rd.close(complete=not prog.stopping and decoder.error is None)
    out = summarize(cfg, prog, decoder.counters, rd.errors.path)
    out.update(decoder.summary())
    if decoder.error:  # e.g. a failed Ray job: what was delivered is committed; a rerun resumes
        out.update(error=decoder.error, complete=False, exit_code=errors.EXIT_FAILED)
    return out


def admit(rows: Iterable[PromptRow | RejectedRow], rd: RunDir, partition: Partition | None, prog: Progress,
          signals: Signals) -> Iterator[PromptRow]:
    """The rows to decode: this task's, not done, valid (the reader's rejects are logged here).
    Stops reading at the first signal."""
    for r in rows:
        if signals.stopping:
            return
        if partition is not None and not partition.owns(r):
            prog.other_shards += 1
            continue
        if isinstance(r, RejectedRow):
            rd.errors.add(r)  # logged once across resumes, counted on every run that reads it
            prog.rejected += 1
            continue
        if rd.is_done(r.id):
            prog.skipped += 1
            continue
        yield r
    rd.errors.sync()  # the whole input is read: its rejects are durable


def commit(items: Iterable[Decoded | RejectedRow], rd: RunDir, prog: Progress, commit_every_s: float,
           on_result: Callable[[Progress], None] | None) -> None:
    """Write what a decoder delivers through the run directory (the only writer), committing the
    open shard at least every `commit_every_s`."""
    last_commit = time.monotonic()
    for item in items:
        if isinstance(item, RejectedRow):
            rd.errors.add(item)
            prog.rejected += 1
            continue
        rd.add(item.record)
        prog.rows += 1
        prog.tokens += item.record["completion_tokens"]
        prog.steps += item.steps
        if on_result:
            on_result(prog)
        if time.monotonic() - last_commit > commit_every_s:
            rd.writer.flush()
            rd.errors.sync()
            last_commit = time.monotonic()


def summarize(cfg: RunConfig, prog: Progress, c: dict[str, int], errors_file: Path) -> dict[str, Any]:
    """The run summary printed as JSON."""
    elapsed = time.perf_counter() - prog.started
    padded = c["prefill_padded_tokens"]
    out = {
        "out_dir": str(cfg.out_dir), "rows_written": prog.rows, "rows_skipped_done": prog.skipped,
        "rows_rejected": prog.rejected, "completion_tokens": prog.tokens, "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(prog.tokens / elapsed, 2) if elapsed > 0 else 0.0,
        "rows_per_s": round(prog.rows / elapsed, 3) if elapsed > 0 else 0.0,
        "mean_tokens_per_step": round(prog.tokens / prog.steps, 3) if prog.steps else 0.0,
        "prefill_padding_waste": round(1 - c["prefill_tokens"] / padded, 4) if padded else 0.0,
        "denoiser_calls": c["denoiser_calls"], "context_calls": c["context_calls"],
        "interrupted": bool(prog.stopping), "complete": not prog.stopping,
        "errors_file": str(errors_file),
        "exit_code": errors.EXIT_INTERRUPTED if prog.stopping else errors.EXIT_OK,
    }
    if cfg.partition is not None:
        out["shard"] = {"index": cfg.partition.index, "count": cfg.partition.count,
                        "rows_other_shards": prog.other_shards}
    return out
