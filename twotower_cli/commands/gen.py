"""`twotower gen`: plan a run from flags, drive the pipeline with a progress display, print the summary.

Order of work, so that a rerun with nothing left costs well under a second and no torch:
  1. torch-free: the checkpoint's path and fingerprint (model.files), partition and device flags;
  2. the pipeline opens the output directory (fingerprint checked from its manifest: a changed
     checkpoint is refused, exit 2), rebuilds the done set from the shards and reads the input up
     to the first row to do; none: "nothing to do", exit 0;
  3. only then `load()`: torch, threads, devices, the model and tokenizer.
With `-o -` rows stream to stdout as JSON lines and the summary goes to stderr (no resume).
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import DecodeParams
from ..errors import EXIT_REJECTS, UserError
from ..model import files as ckpt
from ..options import DEFAULT_THREADS, GenOptions, Placement, ScaleOut

if TYPE_CHECKING:
    from ..io.schema import RejectedRow
    from ..pipeline import RunConfig

# torch, the model and the pipeline are imported by the functions that use them: `twotower gen
# --help`, a flag error and a no-op rerun need none of them.

_DTYPE_RE = re.compile(r"^(torch\.)?(bfloat16|float16|float32|float64|half|float|double|bf16|fp16|fp32)$")
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu|meta|hpu|xla|privateuseone)(:\d+)?$")


def count_input_rows(source: str, limit: int | None) -> int | None:
    """Rows in the input when cheap to know (for the ETA): JSONL lines or Parquet metadata."""
    if source == "-":
        return limit
    p = Path(source)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            return limit  # a FIFO, a device, <(zcat ...): counting would consume it
    except (OSError, ValueError):
        return None
    try:
        with open(p, "rb") as f:
            head = f.read(4)
            if head == b"PAR1":
                import pyarrow.parquet as pq

                n = pq.ParquetFile(f).metadata.num_rows
            else:
                f.seek(0)
                n, last = 0, b"\n"
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    n += chunk.count(b"\n")
                    last = chunk[-1:]
                n += last != b"\n"
    except Exception:  # noqa: BLE001 - only an ETA: an unreadable input is reported by the reader
        return None
    return min(n, limit) if limit is not None else n


def streaming(run: GenOptions) -> bool:
    """`-o -`: rows to stdout as JSON lines. (A directory named - is `-o ./-`.)"""
    return str(run.out) == "-"


def default_threads() -> int:
    """--threads / --ray-cpus default: DEFAULT_THREADS (measured, README), never more than the
    CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(DEFAULT_THREADS, cpus))


def plan(run: GenOptions, decode: DecodeParams, placement: Placement, scale: ScaleOut) -> RunConfig:
    """Everything that needs no torch: the checkpoint's path and fingerprint, the partition and
    the device flags' shape. The model and tokenizer are filled in by `load`."""
    from ..io.partition import from_flags
    from ..pipeline import RunConfig

    if not streaming(run):
        _check_utf8_name(run.out, "the output directory")
    path = placement.model or ckpt.default_checkpoint()
    if path is None:
        raise UserError("no --model given and this build has no embedded model")
    _check_utf8_name(path, "the --model directory")
    # a missing or broken checkpoint is one line, exit 2; a big weight file is hashed once (cached)
    fp = ckpt.fingerprint(path, on_hash=None if run.quiet else _hashing_note)
    try:
        partition = from_flags(scale.num_shards, scale.shard_index)
    except ValueError as e:
        raise UserError(str(e)) from None
    if placement.dtype is not None and _DTYPE_RE.match(placement.dtype.lower()) is None:
        # checked here, torch-free, before the directory is touched (load() resolves the name)
        raise UserError(f"unknown dtype {placement.dtype!r}; use bfloat16, float16 or float32")
    if (placement.ctx_device or placement.den_device) and placement.device:
        raise UserError("give --device, or --ctx-device/--den-device, not both")
    for d in (placement.device, placement.ctx_device, placement.den_device):
        if d and not _DEVICE_RE.match(d):
            raise UserError(f"unknown device {d!r}")
        if d and d.startswith("cuda") and not scale.use_ray:  # Ray: the workers' GPUs
            import torch  # only when CUDA is asked for: refuse before the output directory is touched

            if not torch.cuda.is_available():
                raise UserError(f"device {d!r} asked for, but CUDA is not available")
    if streaming(run) and scale.use_ray:
        raise UserError("-o - streams rows from this process; it does not combine with --ray")
    return RunConfig(
        source=run.source, out_dir=run.out, model=None, tokenizer=None, model_name=Path(path).resolve().name,
        model_fingerprint=fp, defaults=decode, max_batch_rows=run.max_batch_rows,
        max_batch_tokens=run.max_batch_tokens, rows_per_shard=run.rows_per_shard,
        prompt_field=run.prompt_field, id_field=run.id_field, limit=run.limit,
        overwrite=run.overwrite, partition=partition, ar_score=run.ar_score, dtype=placement.dtype,
        format=run.output_format, regenerate_changed=run.regenerate_changed,
    )


def _hashing_note(file: Path, size: int) -> None:
    if size >= 1 << 30:
        print(f"note: hashing {file.name} ({size / 2**30:.1f} GiB) for the run fingerprint; once per file "
              "(cached per user)", file=sys.stderr, flush=True)


def _check_utf8_name(path: str | os.PathLike, what: str) -> None:
    """Arrow and the checkpoint loaders take paths as UTF-8 text: a name that is not valid UTF-8
    (undecodable bytes, which Python keeps as lone surrogates) is refused up front, in one line."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
        raise UserError(f"{what} {shown} has a name that is not valid UTF-8; rename it or choose another") from None


def quiet_third_parties() -> None:
    """-q: no warnings from libraries (transformers' advisories, Python warnings) on stderr."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    for name in ("transformers", "tokenizers", "huggingface_hub", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load(cfg: RunConfig, decode: DecodeParams, placement: Placement, scale: ScaleOut) -> None:
    """Torch, threads, devices, then the model and tokenizer into `cfg` (called by the pipeline
    once there is a row to decode)."""
    import torch

    from ..model.checkpoint import load_model, place_towers_on_devices
    from ..model.tokenizer import load_tokenizer

    path = placement.model or ckpt.default_checkpoint()
    use_ray = scale.use_ray
    device, ctx_dev, den_dev = placement.device, placement.ctx_device, placement.den_device
    for d in (device, ctx_dev, den_dev):  # CUDA's presence was checked by `plan`, before any file was touched
        if d:
            try:
                torch.device(d)
            except RuntimeError:
                raise UserError(f"unknown device {d!r}") from None
    torch.set_num_threads(placement.threads or default_threads())
    if use_ray:  # the actors load the weights; the driver checks the checkpoint's keys and shapes only
        model = load_model(path, device="meta")
    else:
        model = load_model(path, device=ctx_dev or device, dtype=placement.dtype).eval()
    if (ctx_dev or den_dev) and not use_ray:
        place_towers_on_devices(model, ctx_dev or "cpu", den_dev or ctx_dev or "cpu")
    tok = load_tokenizer(path)
    if decode.mode != "ar" and model.ar_only:
        raise UserError(f"{path} has no denoiser tower: only --mode ar works with it")
    if decode.mask_token_id >= model.config.vocab_size:
        raise UserError(f"--mask-token-id {decode.mask_token_id} is outside the vocabulary")
    cfg.model, cfg.tokenizer = model, tok


def _run_ray(cfg: RunConfig, run: GenOptions, placement: Placement, scale: ScaleOut, prepare, on_result,
             notes, progress) -> dict[str, Any]:
    from .. import ray_pipeline

    ray_opts = ray_pipeline.RayOptions(
        model_path=placement.model or ckpt.default_checkpoint(), address=scale.ray_address,
        actors=scale.ray_actors, cpus_per_actor=float(default_threads()) if scale.ray_cpus is None else scale.ray_cpus,
        batch_rows=scale.ray_batch_rows, device=placement.device, ctx_device=placement.ctx_device,
        den_device=placement.den_device, dtype=placement.dtype, quiet=run.quiet,
    )
    return ray_pipeline.run(cfg, ray_opts, on_result=on_result, notes=notes, prepare=prepare, progress=progress)


def _rejected_line(r: RejectedRow) -> str:
    return "rejected: " + json.dumps(r.to_dict(), ensure_ascii=False)


def run_gen(run: GenOptions, decode: DecodeParams, placement: Placement, scale: ScaleOut) -> int:
    """The whole `twotower gen`: returns the exit code. User-fixable errors propagate (the CLI prints
    them as one line, exit 2)."""
    from ..pipeline import Progress
    from ..progress import display

    if scale.use_ray:  # before loading anything: a missing extra is one line, exit 2
        from ..ray_pipeline import import_ray

        import_ray()
    if run.quiet:
        quiet_third_parties()
    cfg = plan(run, decode, placement, scale)
    stream = streaming(run)
    # A task of a job array does about 1/N of the input: no total (and no ETA) rather than a wrong one.
    total = count_input_rows(run.source, run.limit) if cfg.partition is None else None
    notes = (lambda m: print(f"note: {m}", file=sys.stderr, flush=True)) if not run.quiet else None
    prog = Progress()
    with display(prog, total, quiet=run.quiet, log_every=run.log_every) as disp:
        if scale.use_ray:
            summary = _run_ray(cfg, run, placement, scale, lambda: load(cfg, decode, placement, scale),
                               disp.update, notes, prog)
        else:
            from ..pipeline import run as run_pipeline

            out_stream = None
            if stream:
                sys.stdout.flush()
                out_stream = sys.stdout.buffer
            on_reject = None if run.quiet else (lambda r: print(_rejected_line(r), file=sys.stderr, flush=True))
            summary = run_pipeline(cfg, on_result=disp.update, notes=notes, progress=prog, stream=out_stream,
                                   on_reject=on_reject, load=lambda c: load(c, decode, placement, scale))
    if run.fail_on_error and summary["rows_rejected"] and not summary["exit_code"]:
        summary["exit_code"] = EXIT_REJECTS
    print(json.dumps(summary), file=sys.stderr if stream else sys.stdout, flush=True)
    where = "stdout" if stream else str(run.out)
    if summary.get("error"):  # a failed Ray job: what was committed stays; a rerun resumes
        print(f"error: {summary['error']}; {summary['rows_written']} row(s) committed, rerun the same command "
              "to resume", file=sys.stderr)
    elif summary["nothing_to_do"]:
        if not run.quiet:
            n = summary["rows_in_output"]
            again = f" ({summary['rows_rejected']} rejected, see {summary['errors_file']})" \
                if summary["rows_rejected"] and summary["errors_file"] else ""
            print(f"nothing to do: {n} rows already in {where}{again}", file=sys.stderr)
    elif summary["interrupted"]:
        if stream:
            print(f"interrupted: {summary['rows_written']} row(s) written to stdout; -o - does not resume",
                  file=sys.stderr)
        else:
            print(f"interrupted: {summary['rows_written']} row(s) committed this run, {summary['rows_in_output']} "
                  f"in {where} in all; rerun the same command to resume", file=sys.stderr)
    if summary["rows_rejected"] and not run.quiet and summary["errors_file"] and not summary["nothing_to_do"]:
        print(f"note: {summary['rows_rejected']} row(s) rejected, see {summary['errors_file']}", file=sys.stderr)
    return summary["exit_code"]
