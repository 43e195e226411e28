"""reader -> batcher -> engine -> writer, in one visible place; plus resume and signals.

Each stage has one owner: `io.reader` turns input lines into rows, `batcher` turns rows into
token requests in length order, `engine` decodes, `io.manifest.RunDir` commits shards. This module
only connects them, skips rows that are already done (resume), and stops cleanly on a signal:

    first SIGINT / SIGTERM   take no new rows, finish the rows in flight, commit, exit 3
    second signal            stop at once, commit the rows already finished, exit 3

Rows not committed are simply not done: the next run of the same command does them.

A partitioned run (`cfg.partition`, one task of a job array) reads the whole input and keeps the
rows whose id hashes to its shard (io.partition); everything else is the same.
`ray_pipeline.run` is the same run with the engine on a Ray cluster's actors.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .batcher import Batcher, BatchPolicy
from .config import DecodeParams
from .engine import Engine, Request, Result
from .io.manifest import RunDir
from .io.partition import Partition
from .io.reader import read_rows
from .io.schema import SCHEMA_VERSION, PromptRow, RejectedRow

EXIT_INTERRUPTED = 3
EXIT_REJECTS = 4


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


class _Signals:
    """SIGINT/SIGTERM set a counter instead of raising, while the run is in progress."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.saved[s] = signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.progress.stopping += 1

    def __exit__(self, *exc: object) -> None:
        for s, h in self.saved.items():
            signal.signal(s, h)


def run(cfg: RunConfig, on_result: Callable[[Progress], None] | None = None,
        notes: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate every row of `cfg.source` not yet in `cfg.out_dir`. Returns the run summary."""
    prog = Progress()
    rows = read_rows(cfg.source, prompt_field=cfg.prompt_field, id_field=cfg.id_field, limit=cfg.limit)
    with RunDir(cfg.out_dir, fingerprint(cfg), overwrite=cfg.overwrite, rows_per_shard=cfg.rows_per_shard,
                partition=cfg.partition) as rd, _Signals(prog):
        for n in rd.notes:
            if notes:
                notes(n)
        batcher = Batcher(cfg.tokenizer, cfg.defaults, cfg.model.config.max_position_embeddings,
                          BatchPolicy(window=cfg.window), vocab_size=cfg.model.config.vocab_size)
        engine = Engine(cfg.model, max_batch_rows=cfg.max_batch_rows, max_batch_tokens=cfg.max_batch_tokens)

        def todo() -> Iterator[PromptRow | RejectedRow]:
            for r in rows:
                if cfg.partition is not None and not cfg.partition.owns(r):
                    prog.other_shards += 1
                    continue
                if isinstance(r, PromptRow) and rd.is_done(r.id):
                    prog.skipped += 1
                    continue
                yield r

        def requests() -> Iterator[Request]:
            for item in batcher(todo()):
                if prog.stopping:
                    return  # take no new rows; the engine finishes those in flight
                if isinstance(item, RejectedRow):
                    rd.errors.add(item)  # logged once across resumes, counted on every run that reads it
                    prog.rejected += 1
                    continue
                yield item

        last_commit = time.monotonic()
        for res in engine.run(requests(), stop=lambda: prog.stopping > 1):
            rd.add(_record(res, cfg))
            prog.rows += 1
            prog.tokens += res.stats.completion_tokens
            prog.steps += res.stats.steps
            if on_result:
                on_result(prog)
            if time.monotonic() - last_commit > cfg.commit_every_s:
                rd.writer.flush()
                rd.errors.sync()
                last_commit = time.monotonic()
            if prog.stopping > 1:
                break  # a second signal: stop now; finished rows are committed below
        if on_result:
            on_result(prog)
        rd.close(complete=not prog.stopping)
    return summarize(cfg, prog, engine.counters, rd.errors.path)


def summarize(cfg: RunConfig, prog: Progress, c: dict[str, int], errors_file: Path) -> dict[str, Any]:
    """The run summary printed as JSON (shared by the local and the Ray run)."""
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
        "exit_code": EXIT_INTERRUPTED if prog.stopping else 0,
    }
    if cfg.partition is not None:
        out["shard"] = {"index": cfg.partition.index, "count": cfg.partition.count,
                        "rows_other_shards": prog.other_shards}
    return out


def _record(res: Result, cfg: RunConfig) -> dict[str, Any]:
    row: PromptRow = res.meta
    s = res.stats
    keep = ("mode", "gamma", "block_size", "steps_per_block", "temperature", "seed", "prompt_tokens",
            "completion_tokens", "denoiser_steps", "context_forwards", "tokens_per_step", "blocks",
            "finish_reason", "latency_s")
    rec = {k: getattr(s, k) for k in keep}
    rec.update(id=res.id, prompt=row.prompt_text(), completion=_decode(cfg.tokenizer, res.tokens, cfg),
               model=f"{cfg.model_name}@{cfg.model_fingerprint}")
    return rec


def _decode(tok: Any, tokens: list[int], cfg: RunConfig) -> str:
    eos = set(cfg.model.config.eos_ids)
    if tokens and tokens[-1] in eos:
        tokens = tokens[:-1]  # the EOS ends the completion; it is not part of its text
    return tok.decode(tokens, skip_special_tokens=True)
