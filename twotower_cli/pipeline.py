"""The run loop: reader -> filters -> a decoder -> RunDir, in one visible place; plus resume and signals.

Each stage has one owner: `io.reader` turns input lines into rows, a `Decoder` turns rows into
finished output records, `io.rundir.RunDir` commits shards. This module owns the one loop that
connects them, for a local run and a Ray run alike (`generate`):

    read_rows -> partition filter -> done filter (resume) -> decoder.decode -> RunDir (+ errors)

The loop skips rows of other partition tasks and rows already done, logs the reader's rejects,
stops taking input on a signal, commits what the decoder delivers (and the decoder's own rejects),
commits the open shard every `commit_every_s`, reports progress and builds the summary.

The decoder (and so the model) is made only once the loop has found a row to decode: the output
directory is opened first (its fingerprint checked from metadata, the done set rebuilt from the
shards), the input is read up to the first row not done, and only then is `decoder()` called. A
rerun with nothing left never loads the model (`nothing_to_do` in the summary). Rows rejected by an
earlier run with the same fingerprint (e.g. a prompt too long for the model) would be rejected
again: alone they do not count as something to do.

Output goes to a run directory (`io.rundir.RunDir`, resumable) or, with `stream`, to a binary
stream as JSON lines (`io.jsonl_out.JsonlSink`, `-o -`: no resume; a closed pipe ends the run).

Signals:

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
import hashlib
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from . import errors
from .config import DecodeParams
from .io.jsonl_out import JsonlSink
from .io.partition import Partition
from .io.reader import read_rows, row_excerpt
from .io.rundir import RunDir
from .io.schema import SCHEMA_VERSION, STATS_COLUMNS, PromptRow, RejectedRow, describe_fields, sample_key
from .quality import repetition

if TYPE_CHECKING:
    from .engine import Request, Result

# The batcher and the engine (torch) are imported by LocalDecoder when it is made: a rerun with
# nothing left to do never imports torch.

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
    dtype: str | None = None  # the model's compute dtype (None: the checkpoint's); part of the fingerprint
    format: str = "parquet"  # the committed shards (parquet, jsonl, openai), or the lines of a stream
    regenerate_changed: bool = False  # decode again the rows whose input changed under their id (old rows removed)


COUNTERS = ("prefill_calls", "prefill_tokens", "prefill_padded_tokens", "denoiser_calls", "context_calls")


@dataclass
class Progress:
    """Live counters, read by the progress display (from another thread too: plain attributes)."""

    rows: int = 0
    skipped: int = 0
    rejected: int = 0
    other_shards: int = 0  # rows of other tasks of a partitioned run (not this task's to do)
    tokens: int = 0
    # engine.request.Stats.steps: denoiser forwards (diffusion, mock-AR, speculative), the context
    # forwards that chose a token (AR); tokens per step = tokens / steps (SPEC.md §3)
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)
    stopping: int = 0  # signals received
    phase: str = "reading"  # reading (up to the first row to do), loading (the model), generating, done
    decode_started: float | None = None  # when decoding began (the model loaded): rates count from here
    model_load_s: float | None = None  # making the decoder: loading the model (None: not needed)
    first_row_s: float | None = None  # from decode_started to the first committed row
    nothing_to_do: bool = False  # every row was done before: the model was never loaded
    output_closed: bool = False  # -o -: the reader of stdout went away (e.g. `| head`)
    input_changed: int = 0  # rows done before whose input has changed since (kept and logged, or regenerated)
    regenerated: int = 0  # of those, rows decoded again (--regenerate-changed)
    not_in_input: int = 0  # committed rows whose (id, sample) the input no longer has (kept, and logged)


def fingerprint(cfg: RunConfig, extra_fields: Iterable[Any] = ()) -> dict[str, Any]:
    """What a resume must share with the run it continues: the model (and the dtype it runs in),
    the run-level decoding parameters (not `n`: a resume may ask for more samples of each row),
    the input field mapping (another --id-field names other rows; another --prompt-field gives
    other prompts), the output format, and a Parquet input's pass-through columns (the shard schema)."""
    decode = asdict(cfg.defaults)
    decode.pop("n")
    return {"model": cfg.model_name, "checkpoint": cfg.model_fingerprint, "schema": SCHEMA_VERSION,
            "decode": decode, "dtype": cfg.dtype, "format": cfg.format,
            "input": {"prompt_field": cfg.prompt_field, "id_field": cfg.id_field,
                      "columns": describe_fields(list(extra_fields))}}


_INPUT_PERSON = b"twotower-input"
INPUT_CHANGED = ("input changed since its row was committed under this id: the committed completion "
                 "is kept (rerun with --regenerate-changed to generate it again)")
INPUT_CHANGED_REDONE = "input changed since its row was committed under this id: regenerated (--regenerate-changed)"


def not_in_input(sample_index: int) -> str:
    """The error record's reason for a committed row whose key the input no longer has."""
    which = f"sample {sample_index} of this id" if sample_index else "this id"
    return (f"{which} is committed but no longer in the input (its prompt or id was edited, or n lowered): "
            "the row is kept in the output; delete it there, or use --overwrite to start over")


def input_hash(row: PromptRow, defaults: DecodeParams) -> str:
    """The `input_hash` column: blake2b-64 (16 hex) of the row's prompt or messages and its
    effective decoding settings (the run's defaults with the row's overrides; not `n`, which does
    not change any one sample), not of its id nor of its pass-through metadata."""
    decode = {**asdict(defaults), **row.overrides}
    decode.pop("n", None)
    decode["stop"] = list(decode["stop"])  # a tuple (defaults) and a list (overrides) hash the same
    data = orjson.dumps({"prompt": row.prompt, "messages": row.messages, "decode": decode},
                        option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.blake2b(data, digest_size=8, person=_INPUT_PERSON).hexdigest()


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
        self._eager = False

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

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Any signal raises KeyboardInterrupt at once (e.g. while the model loads: nothing to finish)."""
        self._eager = True
        try:
            yield
        finally:
            self._eager = False

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.saved[s] = signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.progress.stopping += 1
        if self._eager or (self.progress.stopping > 1 and self._blocked):
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
        from .batcher import Batcher, BatchPolicy
        from .engine import Engine

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
        last: list[PromptRow] = []

        def pulled() -> Iterator[PromptRow]:
            for r in rows:
                last[:] = [r]
                yield r

        def requests() -> Iterator[Request]:
            for item in self.batcher(pulled()):
                if signals.stopping:
                    return  # take no new rows; the engine finishes those in flight
                if isinstance(item, RejectedRow):
                    # The batcher rejects a row as it pulls it: give its record an excerpt.
                    if not item.raw and last and last[0].id == item.id:
                        item = dc_replace(item, raw=row_excerpt(last[0]))
                    rejected.append(item)  # delivered before the next result, in the order pulled
                    continue
                yield item

        for res in self.engine.run(requests(), stop=lambda: signals.now):
            while rejected:
                yield rejected.popleft()
            yield Decoded(output_record(res, self.cfg.tokenizer, self.cfg.model.config.eos_ids, self.model_label,
                                        self.cfg.defaults.stop), res.stats.steps)
            if signals.now:
                break  # a second signal: stop now; the loop has committed the rows finished
        while rejected:
            yield rejected.popleft()


def output_record(res: Result, tokenizer: Any, eos_ids: Iterable[int], model: str,
                  stops: Iterable[str] = ()) -> dict[str, Any]:
    """The output record of a finished row (created_at is left to the writer: now; input_hash and
    the pass-through columns are added where it is committed, `commit`). `stops`: the run's stop
    strings (a row's own `stop` replaces them)."""
    row: PromptRow = res.meta
    rec = {k: getattr(res.stats, k) for k in STATS_COLUMNS}
    tokens = res.tokens
    if tokens and tokens[-1] in set(eos_ids):
        tokens = tokens[:-1]  # the EOS ends the completion; it is not part of its text
    from .engine.stops import cut_at_stop  # torch is loaded by then (a decoder made this result)

    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stop = row.overrides.get("stop") if "stop" in row.overrides else stops
    if stop:  # the text ends before the first stop string (the engine stopped the row right after it)
        text, found = cut_at_stop(text, stop)
        if found and rec["finish_reason"] != "eos":
            rec["finish_reason"] = "stop"
    rec.update(id=res.id, sample_index=res.sample_index, prompt=row.prompt_text(), chat=row.messages is not None,
               completion=text, model=model, repetition=repetition(tokens))
    return rec


# ---- the run loop ---------------------------------------------------------------------------------


def run(cfg: RunConfig, on_result: Callable[[Progress], None] | None = None,
        notes: Callable[[str], None] | None = None, *, load: Callable[[RunConfig], None] | None = None,
        progress: Progress | None = None, stream: IO[bytes] | None = None,
        on_reject: Callable[[RejectedRow], None] | None = None) -> dict[str, Any]:
    """Generate every row of `cfg.source` not yet in `cfg.out_dir` (or, with `stream`, every row,
    as JSON lines), in this process. `load(cfg)` fills in `cfg.model` and `cfg.tokenizer`; it is
    called only once there is a row to decode. Returns the run summary."""

    def decoder() -> Decoder:
        if load is not None:
            load(cfg)
        return LocalDecoder(cfg)

    return generate(cfg, decoder, on_result, notes, progress=progress, stream=stream, on_reject=on_reject)


def generate(cfg: RunConfig, decoder: Decoder | Callable[[], Decoder],
             on_result: Callable[[Progress], None] | None = None, notes: Callable[[str], None] | None = None,
             *, progress: Progress | None = None, stream: IO[bytes] | None = None,
             on_reject: Callable[[RejectedRow], None] | None = None) -> dict[str, Any]:
    """The one run loop: every row of `cfg.source` not yet in `cfg.out_dir`, decoded by `decoder`
    (or by the decoder `decoder()` returns, called once there is a row to decode) and committed
    here. With `stream`, rows go to it as JSON lines and rejects to `on_reject`. Returns the run
    summary (plus the decoder's entries)."""
    prog = progress or Progress()
    rows = read_rows(cfg.source, prompt_field=cfg.prompt_field, id_field=cfg.id_field, limit=cfg.limit)
    dec = decoder if isinstance(decoder, Decoder) else None
    if stream is not None:
        lines = cfg.format if cfg.format != "parquet" else "jsonl"  # a stream is lines (the CLI refuses parquet)
        sink: RunDir | JsonlSink = JsonlSink(stream, on_reject, format=lines, extra_fields=rows.extra_fields)
    else:
        sink = RunDir(cfg.out_dir, fingerprint(cfg, rows.extra_fields), overwrite=cfg.overwrite,
                      rows_per_shard=cfg.rows_per_shard, partition=cfg.partition, format=cfg.format,
                      extra_fields=rows.extra_fields)
    with sink as rd:
        for n in rd.notes:
            if notes:
                notes(n)
        sig = Signals(prog)
        inflight: dict[str, Inflight] = {}  # id -> the row admitted, its input hash and samples not yet committed
        retract: set[str] | None = set() if cfg.regenerate_changed and stream is None else None
        regenerated: set[str] = set()  # ids of the changed rows decoded again (to do, though logged before)
        todo = admit(rows, rd, cfg.partition, prog, sig, defaults=cfg.defaults, inflight=inflight, retract=retract,
                     regenerated=regenerated)
        try:
            with sig:  # reading up to the first row to do: a signal here stops the run (exit 3)
                held = first_to_do(todo, rd, regenerated)
            if not held and not prog.stopping:
                prog.nothing_to_do = True
            elif not prog.stopping:
                prog.phase = "loading"
                if on_result:
                    on_result(prog)
                t0 = time.perf_counter()
                if dec is None:
                    rd.note_phase("loading")
                    with sig, sig.eager():  # a signal while loading stops the run at once (exit 3)
                        dec = decoder()  # type: ignore[operator]  # loads the model
                    prog.model_load_s = round(time.perf_counter() - t0, 3)
                rd.note_phase("generating")
                prog.phase = "generating"
                prog.started = prog.decode_started = time.perf_counter()
                with dec, Signals(prog) as sig:  # after the decoder starts: our handlers are the ones installed
                    items = dec.decode(_chain(held, todo), sig, rd.is_done)
                    commit(items, rd, prog, cfg.commit_every_s, on_result, inflight, retract, regenerated)
        except KeyboardInterrupt:  # a signal while loading, or interruptible() cut a wait short: stop now
            prog.stopping = max(prog.stopping, 2)
        if prog.nothing_to_do:
            prog.rejected += len(getattr(rd, "rejected_again", ()))
        if prog.input_changed and notes:
            if prog.regenerated:
                notes(f"{prog.input_changed} row(s) done before have another input now under the same id: "
                      f"{prog.regenerated} regenerated (their old rows removed), each logged in {rd.errors_path.name}")
            else:
                notes(f"{prog.input_changed} row(s) done before have another input now under the same id; their "
                      f"committed completions are kept and each is logged in {rd.errors_path.name} "
                      "(rerun with --regenerate-changed to generate them again)")
        error = dec.error if dec is not None else None
        complete = not prog.stopping and error is None and rows.exhausted is True and not prog.output_closed
        if complete and isinstance(rd, RunDir):
            report_not_in_input(rd, prog, notes)
        prog.phase = "done"
        if on_result:
            on_result(prog)
        rd.close(complete=complete)
    out = summarize(cfg, prog, dec.counters if dec is not None else dict.fromkeys(COUNTERS, 0), rd.errors_path)
    out.update(rows_input_changed=prog.input_changed, rows_regenerated=prog.regenerated,
               rows_not_in_input=prog.not_in_input)
    out.update(complete=complete, rows_in_output=rd.rows_committed, nothing_to_do=prog.nothing_to_do,
               input_exhausted=bool(rows.exhausted), model_load_s=prog.model_load_s, first_row_s=prog.first_row_s)
    if stream is not None:
        out.update(out_dir="-", output_closed=prog.output_closed)
    if dec is not None:
        out.update(dec.summary())
    if error:  # e.g. a failed Ray job: what was delivered is committed; a rerun resumes
        out.update(error=error, complete=False, exit_code=errors.EXIT_FAILED)
    return out


def first_to_do(todo: Iterator[PromptRow], rd: RunDir | JsonlSink,
                regenerated: set[str] | frozenset[str] = frozenset()) -> list[PromptRow]:
    """Read `todo` up to its first row that is not a repeat of a row an earlier run rejected
    (which would be rejected again). Returns the rows read, that row last; [] when there is none
    (the repeats are then kept in `rd.rejected_again`)."""
    held: list[PromptRow] = []
    for r in todo:
        held.append(r)
        if r.id in regenerated or not rd.was_rejected(r):
            return held
    rd.rejected_again = held
    return []


def _chain(held: list[PromptRow], rest: Iterator[PromptRow]) -> Iterator[PromptRow]:
    yield from held
    yield from rest


def admit(rows: Iterable[PromptRow | RejectedRow], rd: RunDir | JsonlSink, partition: Partition | None, prog: Progress,
          signals: Signals, *, defaults: DecodeParams | None = None,
          inflight: dict[str, Inflight] | None = None, retract: set[str] | None = None,
          regenerated: set[str] | None = None) -> Iterator[PromptRow]:
    """The rows to decode: this task's, valid (the reader's rejects are logged here), with the
    samples not done yet (`PromptRow.samples`; a row with none left is skipped). Stops reading at
    the first signal. A sample committed by an earlier run whose input has changed since (same
    key, another input hash) is not decoded again but logged, and counted in `prog.input_changed`.
    `inflight` gets each row admitted, by id, with its input hash (for its records, `commit`).
    With `retract` (--regenerate-changed) a changed row is decoded again, every sample: the keys of
    its committed rows go into `retract`, which `commit` removes from the shards before it writes
    any new row (so a crash never leaves two rows under one key)."""
    defaults = defaults if defaults is not None else DecodeParams()
    check = isinstance(rd, RunDir)
    for r in rows:
        if signals.stopping:
            return
        if partition is not None and not partition.owns(r):
            prog.other_shards += 1
            continue
        if isinstance(r, RejectedRow):
            rd.reject(r)  # logged once across resumes, counted on every run that reads it
            prog.rejected += 1
            continue
        n = r.overrides.get("n", defaults.n)
        h: str | None = None
        todo = []
        changed = False
        for k in range(n):
            key = sample_key(r.id, k)
            stored = rd.committed_input(key) if check else None
            if stored is not None:
                prog.skipped += 1
                if stored:
                    h = h or input_hash(r, defaults)
                    changed |= stored != int(h, 16)
                continue
            if rd.is_done(key):
                prog.skipped += 1
                continue
            todo.append(k)
        if changed:
            prog.input_changed += 1
            if retract is None:
                rd.reject(RejectedRow(r.line_no, r.id, INPUT_CHANGED, row_excerpt(r)))
                continue  # its other samples would mix two inputs under one id: none is decoded
            rd.reject(RejectedRow(r.line_no, r.id, INPUT_CHANGED_REDONE, row_excerpt(r)))
            prog.regenerated += 1
            prog.skipped -= n - len(todo)  # counted as skipped above: every sample is decoded again
            retract.update(sample_key(r.id, k) for k in range(n) if k not in todo)
            todo = list(range(n))
            if regenerated is not None:
                regenerated.add(r.id)
        if not todo:
            continue
        if inflight is not None:
            inflight[r.id] = Inflight(r, h or input_hash(r, defaults), set(todo))
        yield r if todo == [0] else dc_replace(r, samples=tuple(todo))
    rd.sync_rejects()  # the whole input is read: its rejects are durable


def commit(items: Iterable[Decoded | RejectedRow], rd: RunDir | JsonlSink, prog: Progress, commit_every_s: float,
           on_result: Callable[[Progress], None] | None,
           inflight: dict[str, Inflight] | None = None, retract: set[str] | None = None,
           regenerated: set[str] | None = None) -> None:
    """Write what a decoder delivers through the run directory or stream (the only writer),
    committing the open shard at least every `commit_every_s`. A stream whose reader went away
    (`-o - | head`) stops the run at once, like a second signal."""
    last_commit = time.monotonic()
    for item in items:
        if prog.output_closed:
            continue  # the decoder stops at its next step; nothing more can be written
        if isinstance(item, RejectedRow):
            if inflight and item.id is not None:
                inflight.pop(item.id, None)  # a rejected row has no sample to commit
            rd.reject(item)
            prog.rejected += 1
            continue
        record = item.record
        if retract and (regenerated is None or record["id"] in regenerated):
            # the old rows of regenerated inputs leave their shards before a new one is written
            # (every key pending so far in one call: each affected shard is rewritten once)
            rd.retract(sorted(retract))
            retract.clear()
        got = inflight.get(record["id"]) if inflight is not None else None
        if got is not None:
            record = with_input(record, got.input_hash, got.row)
            got.samples.discard(record.get("sample_index") or 0)
            if not got.samples:
                del inflight[record["id"]]
        if not rd.add(record):
            prog.output_closed = True
            prog.stopping = max(prog.stopping, 2)  # the decoder stops now (Signals.now)
            continue
        prog.rows += 1
        prog.tokens += item.record["completion_tokens"]
        prog.steps += item.steps
        if prog.first_row_s is None and prog.decode_started is not None:
            prog.first_row_s = round(time.perf_counter() - prog.decode_started, 3)
        if on_result:
            on_result(prog)
        if time.monotonic() - last_commit > commit_every_s:
            rd.checkpoint()
            last_commit = time.monotonic()


@dataclass
class Inflight:
    """A row admitted and not yet wholly committed: for the records of its samples."""

    row: PromptRow
    input_hash: str
    samples: set[int]


def with_input(record: dict[str, Any], in_hash: str, row: PromptRow) -> dict[str, Any]:
    """A record with what comes from its input row rather than its decoding: the input hash, the
    metadata (a JSON object) and a Parquet input's typed pass-through columns."""
    out = {**record, **(row.columns or {})}
    if out.get("input_hash") is None:
        out["input_hash"] = in_hash
    if row.metadata and out.get("metadata") is None:
        out["metadata"] = orjson.dumps(row.metadata, default=str).decode()
    return out


def report_not_in_input(rd: RunDir, prog: Progress, notes: Callable[[str], None] | None) -> None:
    """After a whole input was read: committed rows whose (id, sample) it no longer has are
    counted, logged one by one in the errors sidecar, and named in one note; never deleted."""
    n = rd.orphan_count()
    if not n:
        return
    for row_id, k in rd.orphans():
        rd.reject(RejectedRow(0, row_id, not_in_input(k), ""))
    rd.sync_rejects()
    prog.not_in_input = n
    if notes:
        notes(f"{n} committed row(s) are no longer in the input (edited prompt or id, or a lower n): kept, "
              f"each logged in {rd.errors_path.name}")


def summarize(cfg: RunConfig, prog: Progress, c: dict[str, int], errors_file: Path | None) -> dict[str, Any]:
    """The run summary printed as JSON. Rates count decoding time (after the model loaded);
    `mean_tokens_per_step` is Σ completion tokens / Σ steps (engine.request.Stats.steps)."""
    elapsed = time.perf_counter() - prog.started if prog.decode_started is not None else 0.0
    padded = c["prefill_padded_tokens"]
    out = {
        "out_dir": str(cfg.out_dir), "rows_written": prog.rows, "rows_skipped_done": prog.skipped,
        "rows_rejected": prog.rejected, "completion_tokens": prog.tokens, "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(prog.tokens / elapsed, 2) if elapsed > 0 else 0.0,
        "rows_per_s": round(prog.rows / elapsed, 3) if elapsed > 0 else 0.0,
        "mean_tokens_per_step": round(prog.tokens / prog.steps, 3) if prog.steps else 0.0,
        "prefill_padding_waste": round(1 - c["prefill_tokens"] / padded, 4) if padded else 0.0,
        "denoiser_calls": c["denoiser_calls"], "context_calls": c["context_calls"],
        "interrupted": bool(prog.stopping) and not prog.output_closed, "complete": not prog.stopping,
        "errors_file": None if errors_file is None else str(errors_file),
        "exit_code": errors.EXIT_INTERRUPTED if prog.stopping and not prog.output_closed else errors.EXIT_OK,
    }
    if cfg.partition is not None:
        out["shard"] = {"index": cfg.partition.index, "count": cfg.partition.count,
                        "rows_other_shards": prog.other_shards}
    return out
