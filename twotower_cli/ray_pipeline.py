"""`twotower gen --ray`: the pipeline's run loop with `RayDecoder`, the engine on a Ray cluster's actors.

    driver:  reader -> partition / done filter -> RayDecoder: input blocks (object store)   RunDir
                                                              |                               ^
    actors:          map_batches(_Generate): LocalDecoder (Batcher -> Engine) -> records -----+

The driver runs the same loop as a local run (`pipeline.generate`): it reads and validates the
input with our own reader (so rejection semantics, derived ids and `--limit` are those of the
local run), drops rows of other shards (`--num-shards`) and rows already committed, and commits
what comes back. `RayDecoder` hands the admitted rows to Ray Data as blocks of `batch_rows` rows.
A pool of stateful actors (`_Generate`) loads the model once each (`num_gpus` per actor from the
tower placement: 2 for a two-device split, 1 on one GPU, 0 on CPU; `num_cpus` configurable, as
many torch threads) and decodes each batch with the pipeline's `LocalDecoder` (the batch sorted by
length by the `Batcher`, then the `Engine`). Actors return finished records; the driver writes
them through the same single-writer RunDir as a local run, so the output directory (shards,
manifest, errors, resume, `twotower stats`) is the local run's, and a Ray run and a local run can
resume each other.

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
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from .batcher import BatchPolicy
from .errors import UserError
from .io.schema import PromptRow, RejectedRow, sample_key
from .pipeline import Decoded, Decoder, LocalDecoder, Progress, RunConfig, Signals, generate

FAULT_ENV = "TWOTOWER_RAY_FAULT"  # testing only: "ROW_ID:MARKER" -> one actor dies on ROW_ID's batch
# Driver -> actors: one PromptRow per row (overrides and messages as JSON, so any value round-trips).
_IN_SCHEMA = pa.schema([("id", pa.string()), ("line_no", pa.int64()), ("prompt", pa.string()),
                        ("messages", pa.string()), ("overrides", pa.string()), ("source_format", pa.string()),
                        ("samples", pa.list_(pa.int64()))])
# Actors -> driver: "row" (an output record), "rejected" (a RejectedRow) or "counters" (engine counters).
_OUT_SCHEMA = pa.schema([("kind", pa.string()), ("payload", pa.binary())])
_COUNTERS = ("prefill_calls", "prefill_tokens", "prefill_padded_tokens", "denoiser_calls", "context_calls")


class RayUnavailable(UserError):
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
        notes: Callable[[str], None] | None = None, *, prepare: Callable[[], None] | None = None,
        progress: Progress | None = None) -> dict[str, Any]:
    """Generate every row of `cfg.source` not yet in `cfg.out_dir` on Ray actors. Returns the summary
    of `pipeline.run` plus a "ray" entry; on a failed Ray job the summary has "error" and exit 1.

    `prepare()` (the driver's checks of the checkpoint) runs once there is a row to decode.
    Signals: the first SIGINT/SIGTERM stops when the next batch arrives, the second at once; the
    rows received are committed, those in flight on the actors are redone by the next run (exit 3).
    """
    ray = import_ray()

    def decoder() -> RayDecoder:  # made once there is a row to decode (a no-op rerun starts no Ray)
        if prepare is not None:
            prepare()
        return RayDecoder(ray, cfg, opts, notes or (lambda _m: None))

    return generate(cfg, decoder, on_result, notes, progress=progress)


class RayDecoder(Decoder):
    """The pipeline's decoder on a Ray cluster: rows -> object-store blocks -> actors -> records.

    Entering it joins (or starts) Ray, with stdout pointed at stderr until it exits: stdout
    carries only the JSON summary, and Ray prints its raylet messages ("a worker died") and the
    workers' stdout to sys.stdout. A failed Ray job (after Ray's retries) becomes `error`: the
    records received are committed, the run exits 1, and a rerun resumes.
    """

    def __init__(self, ray: Any, cfg: RunConfig, opts: RayOptions, say: Callable[[str], None]):
        self.ray, self.cfg, self.opts, self.say = ray, cfg, opts, say
        self.batch_rows = opts.batch_rows or 4 * cfg.max_batch_rows
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.info: dict[str, Any] = {"actors": opts.actors, "batch_rows": self.batch_rows, "batches": 0,
                                     "duplicates_dropped": 0}
        self.error: str | None = None
        self._started = False
        self._stdout: contextlib.ExitStack | None = None

    def __enter__(self) -> RayDecoder:
        self._stdout = contextlib.ExitStack()
        self._stdout.enter_context(contextlib.redirect_stdout(sys.stderr))
        try:
            self._started = _connect(self.ray, self.opts)
        except Exception as e:
            if _is_ray_error(e):
                self.error = f"the Ray job failed: {root_cause(e)}"
                return self  # the loop commits, exit 1
            self._stdout.close()
            raise
        except BaseException:  # a signal before our handlers: the loop stops at once (exit 3)
            self._stdout.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._started:
                self.ray.shutdown()
        finally:
            if self._stdout is not None:
                self._stdout.close()

    def summary(self) -> dict[str, Any]:
        return {"ray": self.info}

    def decode(self, rows: Iterable[PromptRow], signals: Signals,
               is_done: Callable[[str], bool]) -> Iterator[Decoded | RejectedRow]:
        """Submit every row first (the driver reads the whole remaining input), then yield the
        actors' records batch by batch. The first signal stops after the batch that arrives next;
        the second also cuts the wait for it short."""
        if self.error:
            return
        try:
            blocks = self._submit(rows, signals)
            self.info["batches"] = len(blocks)
            if not blocks or signals.stopping:
                return
            ds, gpus = _dataset(self.ray, blocks, self.cfg, self.opts, self.batch_rows)
            _check_resources(self.ray, gpus, self.say)
            batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2))
            while True:
                with signals.interruptible():
                    batch = next(batches, None)
                if batch is None:
                    return
                yield from self.unpack(batch, is_done)
                if signals.stopping:
                    return  # any signal: stop now; the rows received are committed
        except Exception as e:  # a failed Ray job: the loop commits what arrived, exit 1
            if not _is_ray_error(e):
                raise
            self.error = f"the Ray job failed: {root_cause(e)}"

    def _submit(self, rows: Iterable[PromptRow], signals: Signals) -> list[Any]:
        """The admitted rows -> object-store blocks of `batch_rows` rows."""
        blocks, buf = [], []
        for r in rows:
            buf.append(_row_to_dict(r))
            if len(buf) >= self.batch_rows:
                blocks.append(self.ray.put(pa.Table.from_pylist(buf, schema=_IN_SCHEMA)))
                buf = []
        if buf and not signals.stopping:
            blocks.append(self.ray.put(pa.Table.from_pylist(buf, schema=_IN_SCHEMA)))
        return blocks

    def unpack(self, batch: pa.Table, is_done: Callable[[str], bool]) -> Iterator[Decoded | RejectedRow]:
        """One batch of the actors' output -> records and rejects; engine counters are summed. A
        record whose id is already done or written (a retried task's second delivery) is dropped
        and counted."""
        for kind, payload in zip(batch.column("kind").to_pylist(), batch.column("payload").to_pylist()):
            d = orjson.loads(payload)
            if kind == "counters":
                for k in _COUNTERS:
                    self.counters[k] += d.get(k, 0)
            elif kind == "rejected":
                yield RejectedRow(**d)
            elif is_done(sample_key(d["id"], d.get("sample_index") or 0)):
                self.info["duplicates_dropped"] += 1
            else:
                d["created_at"] = datetime.fromisoformat(d["created_at"])
                steps = d.pop("_steps")
                yield Decoded(d, steps)


def _connect(ray: Any, opts: RayOptions) -> bool:
    """Join the cluster (or start a local instance). True if this call started Ray."""
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=opts.address or None, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
            where = opts.address or os.environ.get("RAY_ADDRESS") or "a new local instance"
            raise RayUnavailable(f"cannot start or join Ray ({where}): {root_cause(e)}") from None
    # Our progress display (or none with -q) instead of Ray Data's bars and INFO lines on stderr.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return started


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
        "ar_score": cfg.ar_score,
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


def _is_ray_error(e: BaseException) -> bool:
    return (type(e).__module__ or "").startswith("ray.")


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$")


def root_cause(e: BaseException) -> str:
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
            "overrides": orjson.dumps(r.overrides).decode(), "source_format": r.source_format,
            "samples": list(r.samples)}


def _dict_to_row(d: dict[str, Any]) -> PromptRow:
    return PromptRow(d["id"], d["line_no"], d["prompt"], None if d["messages"] is None else orjson.loads(d["messages"]),
                     orjson.loads(d["overrides"]), d["source_format"], samples=tuple(d["samples"]))


# ---- the actors -----------------------------------------------------------------------------------


class _Generate:
    """One Ray Data actor: the model loaded once, then the pipeline's LocalDecoder (Batcher +
    Engine) on each batch of rows."""

    def __init__(self, *, model_path: str, fingerprint: str, model_name: str, defaults: Any, device: str | None,
                 ctx_device: str | None, den_device: str | None, dtype: str | None, max_batch_rows: int,
                 max_batch_tokens: int, threads: int, ar_score: bool | None = None, fault: str | None = None):
        import torch

        from .model.checkpoint import fingerprint as checkpoint_fingerprint
        from .model.checkpoint import load_model, place_towers_on_devices
        from .model.tokenizer import load_tokenizer

        torch.set_num_threads(threads)
        if checkpoint_fingerprint(model_path) != fingerprint:
            raise RuntimeError(f"the checkpoint at {model_path} on this node differs from the driver's")
        model = load_model(model_path, device=ctx_device or device, dtype=dtype).eval()
        if ctx_device or den_device:
            place_towers_on_devices(model, ctx_device or "cpu", den_device or ctx_device or "cpu")
        cfg = RunConfig(source="", out_dir=Path("."), model=model, tokenizer=load_tokenizer(model_path),
                        model_name=model_name, model_fingerprint=fingerprint, defaults=defaults,
                        max_batch_rows=max_batch_rows, max_batch_tokens=max_batch_tokens, ar_score=ar_score)
        self.decoder = LocalDecoder(cfg)
        self.no_signals = Signals(Progress())  # never installed: the driver handles signals
        self.fault = fault.split(":", 1) if fault else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [_dict_to_row(d) for d in batch.to_pylist()]
        before = dict(self.decoder.counters)
        kinds: list[str] = []
        payloads: list[bytes] = []
        # The whole batch is one length-sorted window: rows of similar length prefill together.
        self.decoder.batcher.policy = BatchPolicy(window=max(1, len(rows)))
        for item in self.decoder.decode(rows, self.no_signals, lambda _id: False):
            if isinstance(item, RejectedRow):
                kinds.append("rejected")
                payloads.append(orjson.dumps(item.to_dict()))
                continue
            rec = {**item.record, "created_at": datetime.now(timezone.utc), "_steps": item.steps}
            kinds.append("row")
            payloads.append(orjson.dumps(rec))
        kinds.append("counters")
        payloads.append(orjson.dumps({k: self.decoder.counters[k] - before.get(k, 0) for k in _COUNTERS}))
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
