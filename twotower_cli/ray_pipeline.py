"""`twotower gen --ray`: the same run as `pipeline.run`, with the engine on a Ray cluster's actors.

    driver:  reader -> partition / done filter -> input blocks (object store)        RunDir
                                   |                                                   ^
    actors:          map_batches(_Generate): Batcher (length order) -> Engine -> records

The driver reads and validates the input with our own reader (so rejection semantics, derived
ids and `--limit` are those of the local run), drops rows of other shards (`--num-shards`) and
rows already committed, and hands the rest to Ray Data as blocks of `batch_rows` rows. A pool of
stateful actors (`_Generate`) loads the model once each (`num_gpus` per actor from the tower
placement: 2 for a two-device split, 1 on one GPU, 0 on CPU; `num_cpus` configurable, as many
torch threads), sorts each batch by length with the `Batcher` and decodes it with the `Engine`.
Actors return finished records; the driver writes them through the same single-writer RunDir as
a local run, so the output directory (shards, manifest, errors, resume, `twotower stats`) is the
local run's, and a Ray run and a local run can resume each other.

Exactly once, and why the driver commits. The guarantees of the local run hold because only the
driver commits:
- no loss: Ray Data restarts a dead actor (max_restarts=-1) and retries its tasks
  (max_task_retries); a row that never comes back is simply not committed, and the next run of
  the same command (after any crash, of an actor, a node or the driver) does it, because the done
  set is rebuilt from the committed shards and filtered out before anything is submitted;
- no duplicate: RunDir refuses an id twice, and the driver drops any result whose id is already
  done or pending (a retried task whose first attempt also delivered), counting it in the summary.
  Results are deterministic per row (greedy, or noise keyed by row id and seed), so which copy is
  kept does not matter.
The alternatives were weighed: actors committing their own shards (names unique per task and
attempt) scale output I/O but leave a retried task's rows twice on disk until some reader
deduplicates, and the output is read by duckdb, polars and `datasets`, which would see both
copies; Ray Data's own checkpointing keys progress by its own files, which neither `twotower
stats` nor a local resume understand. The driver's cost is small: it writes ~1 KB per generated
row, far below what any driver can do, while the actors spend milliseconds to seconds per row.

Limits: the driver reads the whole (remaining) input before the first batch runs (into the
object store, which spills to disk, so driver memory stays flat); rows in flight when the driver
stops (a signal, a crash) are redone by the next run. The checkpoint path must be readable on
every node (a shared filesystem, or the same path in each node's image), and each actor checks
the checkpoint's fingerprint against the driver's.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from .io.manifest import RunDir
from .io.reader import read_rows
from .io.schema import PromptRow, RejectedRow
from .pipeline import Progress, RunConfig, _record, _Signals, fingerprint, summarize

FAULT_ENV = "TWOTOWER_RAY_FAULT"  # testing only: "ROW_ID:MARKER" -> one actor dies on ROW_ID's batch
EXIT_FAILED = 1
# Driver -> actors: one PromptRow per row (overrides and messages as JSON, so any value round-trips).
_IN_SCHEMA = pa.schema([("id", pa.string()), ("line_no", pa.int64()), ("prompt", pa.string()),
                        ("messages", pa.string()), ("overrides", pa.string()), ("source_format", pa.string())])
# Actors -> driver: "row" (an output record), "rejected" (a RejectedRow) or "counters" (engine counters).
_OUT_SCHEMA = pa.schema([("kind", pa.string()), ("payload", pa.binary())])
_COUNTERS = ("prefill_calls", "prefill_tokens", "prefill_padded_tokens", "denoiser_calls", "context_calls")


class RayUnavailable(Exception):
    """`--ray` without the `ray` extra installed, or no Ray to join (the CLI exits 2 with this line)."""


@dataclass
class RayOptions:
    model_path: Path
    address: str | None = None  # None: $RAY_ADDRESS, else a new local instance; "auto": this node's cluster
    actors: int | None = None  # a fixed pool size; None: autoscale from 1 to what the cluster holds
    cpus_per_actor: float = 1.0  # also the actor's torch threads (at least 1)
    batch_rows: int | None = None  # rows per actor call (None: 4 x max_batch_rows)
    device: str | None = None
    ctx_device: str | None = None
    den_device: str | None = None
    dtype: str | None = None
    max_task_retries: int = 3  # per batch; a batch that kills its actor every time fails the job
    quiet: bool = False


def actor_placement(device: str | None, ctx_device: str | None,
                    den_device: str | None) -> tuple[int, str | None, str | None, str | None]:
    """(GPUs per actor, and the device flags as the actor sees them) for a placement: 2 GPUs for a
    two-device tower split, 1 on one GPU, 0 on CPU. Ray gives each actor its own GPUs, numbered from
    cuda:0 (CUDA_VISIBLE_DEVICES), so `--ctx-device cuda:2 --den-device cuda:3` becomes cuda:0 and
    cuda:1 inside the actor, and `--device cuda:5` becomes cuda:0."""
    import torch

    seen: dict[int, int] = {}

    def local(d: str | None) -> str | None:
        if not d or (dev := torch.device(d)).type != "cuda":
            return d
        return f"cuda:{seen.setdefault(dev.index or 0, len(seen))}"

    device, ctx_device, den_device = local(device), local(ctx_device), local(den_device)
    return len(seen), device, ctx_device, den_device


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is the part we need
    except ImportError:
        raise RayUnavailable(
            "--ray needs Ray Data, which is not installed: pip install 'twotower-cli[ray]'"
        ) from None
    return ray


# ---- the driver -----------------------------------------------------------------------------------


def run(cfg: RunConfig, opts: RayOptions, on_result: Callable[[Progress], None] | None = None,
        notes: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate every row of `cfg.source` not yet in `cfg.out_dir` on Ray actors. Returns the summary
    of `pipeline.run` plus a "ray" entry; on a failed Ray job the summary has "error" and exit 1.

    Signals: the first SIGINT/SIGTERM stops when the next batch arrives, the second at once; the
    rows received are committed, those in flight on the actors are redone by the next run (exit 3).
    """
    ray = import_ray()
    say = notes or (lambda _m: None)
    prog = Progress()
    batch_rows = opts.batch_rows or 4 * cfg.max_batch_rows
    rows = read_rows(cfg.source, prompt_field=cfg.prompt_field, id_field=cfg.id_field, limit=cfg.limit)
    counters = dict.fromkeys(_COUNTERS, 0)
    info: dict[str, Any] = {"actors": opts.actors, "batch_rows": batch_rows, "batches": 0, "duplicates_dropped": 0}
    error = None
    with RunDir(cfg.out_dir, fingerprint(cfg), overwrite=cfg.overwrite, rows_per_shard=cfg.rows_per_shard,
                partition=cfg.partition) as rd:
        for n in rd.notes:
            say(n)
        started_ray = False
        # stdout carries only the JSON summary: Ray prints its raylet messages ("a worker died")
        # and the workers' stdout to sys.stdout, so point that at stderr while Ray runs.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                started_ray = _connect(ray, opts)
                with _RaySignals(prog) as sig:  # after ray.init, so that our handlers are the ones installed
                    blocks = _submit(ray, rows, rd, cfg, prog, batch_rows)
                    info["batches"] = len(blocks)
                    if blocks and not prog.stopping:
                        ds, gpus = _dataset(ray, blocks, cfg, opts, batch_rows)
                        _check_resources(ray, gpus, say)
                        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
                        consume(sig.waiting(batches), rd, prog, counters, info, cfg.commit_every_s, on_result)
            except KeyboardInterrupt:
                prog.stopping = max(prog.stopping, 2)  # the second signal: commit what arrived, exit 3
            except Exception as e:  # a failed Ray job (after Ray's retries): commit what arrived, exit 1
                if not _is_ray_error(e):
                    raise
                error = f"the Ray job failed: {_root_cause(e)}"
            finally:
                if started_ray:
                    ray.shutdown()
        if on_result:
            on_result(prog)
        rd.close(complete=not prog.stopping and error is None)
    out = summarize(cfg, prog, counters, rd.errors.path)
    out["ray"] = info
    if error:
        out.update(error=error, complete=False, exit_code=EXIT_FAILED)
    return out


class _RaySignals(_Signals):
    """The first signal sets the flag (checked between batches); the second also interrupts the
    wait for Ray's next batch, but never a write (that is checked after the batch instead)."""

    blocked = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.progress.stopping += 1
        if self.progress.stopping > 1 and self.blocked:
            raise KeyboardInterrupt

    def waiting(self, batches: Iterable[pa.Table]) -> Iterator[pa.Table]:
        it = iter(batches)
        while True:
            self.blocked = True
            try:
                batch = next(it, None)
            finally:
                self.blocked = False
            if batch is None:
                return
            yield batch


def _connect(ray: Any, opts: RayOptions) -> bool:
    """Join the cluster (or start a local instance). True if this call started Ray."""
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=opts.address or None, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
            where = opts.address or os.environ.get("RAY_ADDRESS") or "a new local instance"
            raise RayUnavailable(f"cannot start or join Ray ({where}): {_root_cause(e)}") from None
    # Our progress display (or none with -q) instead of Ray Data's bars and INFO lines on stderr.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return started


def _submit(ray: Any, rows: Iterable[PromptRow | RejectedRow], rd: RunDir, cfg: RunConfig, prog: Progress,
            batch_rows: int) -> list[Any]:
    """Read, partition, skip done ids, log the reader's rejects; the rest -> object-store blocks."""
    blocks, buf = [], []
    for r in rows:
        if prog.stopping:
            break
        if cfg.partition is not None and not cfg.partition.owns(r):
            prog.other_shards += 1
            continue
        if isinstance(r, RejectedRow):
            rd.errors.add(r)
            prog.rejected += 1
            continue
        if rd.is_done(r.id):
            prog.skipped += 1
            continue
        buf.append(_row_to_dict(r))
        if len(buf) >= batch_rows:
            blocks.append(ray.put(pa.Table.from_pylist(buf, schema=_IN_SCHEMA)))
            buf = []
    if buf and not prog.stopping:
        blocks.append(ray.put(pa.Table.from_pylist(buf, schema=_IN_SCHEMA)))
    rd.errors.sync()
    return blocks


def _check_resources(ray: Any, gpus: int, say: Callable[[str], None]) -> None:
    have = ray.cluster_resources().get("GPU", 0)
    if gpus and have < gpus:
        say(f"each actor needs {gpus} GPU(s) but the Ray cluster has {have:g} now; "
            "the run waits for an autoscaler to add some")


def _dataset(ray: Any, blocks: list[Any], cfg: RunConfig, opts: RayOptions, batch_rows: int) -> tuple[Any, int]:
    gpus, device, ctx_device, den_device = actor_placement(opts.device, opts.ctx_device, opts.den_device)
    if opts.actors:
        pool = ray.data.ActorPoolStrategy(size=opts.actors)
    else:
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=None)
    kwargs = {
        "model_path": str(opts.model_path), "fingerprint": cfg.model_fingerprint, "model_name": cfg.model_name,
        "defaults": cfg.defaults, "device": device, "ctx_device": ctx_device, "den_device": den_device,
        "dtype": opts.dtype, "max_batch_rows": cfg.max_batch_rows,
        "max_batch_tokens": cfg.max_batch_tokens, "threads": max(1, int(opts.cpus_per_actor)),
        "fault": os.environ.get(FAULT_ENV),
    }
    ds = ray.data.from_arrow_refs(blocks)
    args = dict(batch_size=batch_rows, batch_format="pyarrow", compute=pool, fn_constructor_kwargs=kwargs,
                num_cpus=opts.cpus_per_actor, num_gpus=gpus)
    # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1 (forever). Bound the
    # retries of one batch where map_batches still takes actor options (deprecated in Ray 2.60,
    # to be removed in 2.64; after that the defaults apply).
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(ds.map_batches).parameters.values()):
        args.update(max_restarts=-1, max_task_retries=opts.max_task_retries)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return ds.map_batches(_Generate, **args), gpus


def consume(batches: Iterable[pa.Table], rd: RunDir, prog: Progress, counters: dict[str, int],
            info: dict[str, Any], commit_every_s: float, on_result: Callable[[Progress], None] | None) -> None:
    """Commit the actors' output through the run directory (the only writer). A result whose id is
    already done or pending (a retried task's second delivery) is dropped and counted."""
    last_commit = time.monotonic()
    for batch in batches:
        for kind, payload in zip(batch.column("kind").to_pylist(), batch.column("payload").to_pylist()):
            d = orjson.loads(payload)
            if kind == "counters":
                for k in _COUNTERS:
                    counters[k] += d.get(k, 0)
            elif kind == "rejected":
                rd.errors.add(RejectedRow(**d))
                prog.rejected += 1
            elif rd.is_done(d["id"]):
                info["duplicates_dropped"] += 1
            else:
                d["created_at"] = datetime.fromisoformat(d["created_at"])
                steps = d.pop("_steps")
                rd.add(d)
                prog.rows += 1
                prog.tokens += d["completion_tokens"]
                prog.steps += steps
                if on_result:
                    on_result(prog)
        if time.monotonic() - last_commit > commit_every_s:
            rd.writer.flush()
            rd.errors.sync()
            last_commit = time.monotonic()
        if prog.stopping:
            break  # any signal: stop now; rows received are committed by the caller


def _is_ray_error(e: BaseException) -> bool:
    return (type(e).__module__ or "").startswith("ray.")


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$")


def _root_cause(e: BaseException) -> str:
    """One line for the user. Ray's errors carry the remote traceback in their text: its last
    `SomeError: message` line is where it started (e.g. an actor's constructor)."""
    text = ANSI.sub("", str(e))
    found = [m for line in text.splitlines() if (m := _ERROR_LINE.match(line))]
    if found:
        name, msg = found[-1].groups()
        return f"{name.rsplit('.', 1)[-1]}: {msg.strip()[:300]}"
    first = " ".join(text.split())
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _row_to_dict(r: PromptRow) -> dict[str, Any]:
    return {"id": r.id, "line_no": r.line_no, "prompt": r.prompt,
            "messages": None if r.messages is None else orjson.dumps(r.messages).decode(),
            "overrides": orjson.dumps(r.overrides).decode(), "source_format": r.source_format}


def _dict_to_row(d: dict[str, Any]) -> PromptRow:
    return PromptRow(d["id"], d["line_no"], d["prompt"], None if d["messages"] is None else orjson.loads(d["messages"]),
                     orjson.loads(d["overrides"]), d["source_format"])


# ---- the actors -----------------------------------------------------------------------------------


class _Generate:
    """One Ray Data actor: the model loaded once, then Batcher + Engine on each batch of rows."""

    def __init__(self, *, model_path: str, fingerprint: str, model_name: str, defaults: Any, device: str | None,
                 ctx_device: str | None, den_device: str | None, dtype: str | None, max_batch_rows: int,
                 max_batch_tokens: int, threads: int, fault: str | None = None):
        import torch

        from .batcher import Batcher, BatchPolicy
        from .engine import Engine
        from .model.checkpoint import fingerprint as checkpoint_fingerprint
        from .model.checkpoint import load_model, place_towers_on_devices
        from .model.tokenizer import load_tokenizer

        torch.set_num_threads(threads)
        if checkpoint_fingerprint(model_path) != fingerprint:
            raise RuntimeError(f"the checkpoint at {model_path} on this node differs from the driver's")
        model = load_model(model_path, device=ctx_device or device, dtype=dtype).eval()
        if ctx_device or den_device:
            place_towers_on_devices(model, ctx_device or "cpu", den_device or ctx_device or "cpu")
        tok = load_tokenizer(model_path)
        self.cfg = RunConfig(source="", out_dir=Path("."), model=model, tokenizer=tok, model_name=model_name,
                             model_fingerprint=fingerprint, defaults=defaults)
        self.batcher = lambda window: Batcher(tok, defaults, model.config.max_position_embeddings,
                                              BatchPolicy(window=window), vocab_size=model.config.vocab_size)
        self.engine = Engine(model, max_batch_rows=max_batch_rows, max_batch_tokens=max_batch_tokens)
        self.fault = fault.split(":", 1) if fault else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [_dict_to_row(d) for d in batch.to_pylist()]
        before = dict(self.engine.counters)
        kinds: list[str] = []
        payloads: list[bytes] = []

        def requests():
            # The whole batch is one length-sorted window: rows of similar length prefill together.
            for item in self.batcher(max(1, len(rows)))(rows):
                if isinstance(item, RejectedRow):
                    kinds.append("rejected")
                    payloads.append(orjson.dumps(item.to_dict()))
                    continue
                yield item

        for res in self.engine.run(requests()):
            rec = _record(res, self.cfg)
            rec["created_at"] = datetime.now(timezone.utc)
            rec["_steps"] = res.stats.steps
            kinds.append("row")
            payloads.append(orjson.dumps(rec))
        kinds.append("counters")
        payloads.append(orjson.dumps({k: self.engine.counters[k] - before.get(k, 0) for k in _COUNTERS}))
        self._maybe_fail(rows)
        return pa.Table.from_pydict({"kind": kinds, "payload": payloads}, schema=_OUT_SCHEMA)

    def _maybe_fail(self, rows: list[PromptRow]) -> None:
        """Testing hook ($TWOTOWER_RAY_FAULT="ROW_ID:MARKER"): the first actor to finish the batch
        holding ROW_ID dies before returning it (the marker file makes it happen once)."""
        if self.fault and any(r.id == self.fault[0] for r in rows):
            try:
                os.close(os.open(self.fault[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(1)
