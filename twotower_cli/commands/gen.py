"""`twotower gen`: build a run from flags, drive the pipeline with a progress display, print the summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import DecodeParams
from ..errors import EXIT_REJECTS, UserError
from ..options import GenOptions, Placement, ScaleOut

if TYPE_CHECKING:
    from ..pipeline import Progress, RunConfig

# torch, the model and the pipeline are imported by the functions that use them: `twotower gen
# --help` and a flag error need none of them.


def count_input_rows(source: str, limit: int | None) -> int | None:
    """Rows in the input when cheap to know (for the ETA): JSONL lines or Parquet metadata."""
    if source == "-":
        return limit
    p = Path(source)
    try:
        with open(p, "rb") as f:
            head = f.read(4)
            if head == b"PAR1":
                import pyarrow.parquet as pq

                n = pq.ParquetFile(p).metadata.num_rows
            else:
                f.seek(0)
                n, last = 0, b"\n"
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    n += chunk.count(b"\n")
                    last = chunk[-1:]
                n += last != b"\n"
    except OSError:
        return None
    return min(n, limit) if limit is not None else n


def build(run: GenOptions, decode: DecodeParams, placement: Placement, scale: ScaleOut) -> RunConfig:
    """Check the devices, load the model and tokenizer, and assemble the pipeline's RunConfig."""
    import torch

    from ..io.partition import from_flags
    from ..model.checkpoint import default_checkpoint, fingerprint, load_model, place_towers_on_devices
    from ..model.tokenizer import load_tokenizer
    from ..pipeline import RunConfig

    path = placement.model or default_checkpoint()
    if path is None:
        raise UserError("no --model given and this build has no embedded model")
    try:
        partition = from_flags(scale.num_shards, scale.shard_index)
    except ValueError as e:
        raise UserError(str(e)) from None
    use_ray = scale.use_ray
    device, ctx_dev, den_dev = placement.device, placement.ctx_device, placement.den_device
    if (ctx_dev or den_dev) and device:
        raise UserError("give --device, or --ctx-device/--den-device, not both")
    for d in (device, ctx_dev, den_dev):
        if d:
            try:
                dev = torch.device(d)
            except RuntimeError:
                raise UserError(f"unknown device {d!r}") from None
            if dev.type == "cuda" and not torch.cuda.is_available() and not use_ray:  # Ray: the workers' GPUs
                raise UserError(f"device {d!r} asked for, but CUDA is not available")
    if placement.threads:
        torch.set_num_threads(placement.threads)
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
    return RunConfig(
        source=run.source, out_dir=run.out, model=model, tokenizer=tok, model_name=Path(path).resolve().name,
        model_fingerprint=fingerprint(path), defaults=decode, max_batch_rows=run.max_batch_rows,
        max_batch_tokens=run.max_batch_tokens, rows_per_shard=run.rows_per_shard,
        prompt_field=run.prompt_field, id_field=run.id_field, limit=run.limit,
        overwrite=run.overwrite, partition=partition, ar_score=run.ar_score,
    )


def _run_ray(cfg: RunConfig, run: GenOptions, placement: Placement, scale: ScaleOut, on_result,
             notes) -> dict[str, Any]:
    from .. import ray_pipeline
    from ..model.checkpoint import default_checkpoint

    ray_opts = ray_pipeline.RayOptions(
        model_path=placement.model or default_checkpoint(), address=scale.ray_address, actors=scale.ray_actors,
        cpus_per_actor=1.0 if scale.ray_cpus is None else scale.ray_cpus, batch_rows=scale.ray_batch_rows,
        device=placement.device, ctx_device=placement.ctx_device, den_device=placement.den_device,
        dtype=placement.dtype, quiet=run.quiet,
    )
    return ray_pipeline.run(cfg, ray_opts, on_result=on_result, notes=notes)


class Display:
    """A rich progress bar on stderr: rows, generated tokens/s, mean tokens per step, rejects, ETA."""

    def __init__(self, total: int | None, quiet: bool):
        self.bar = None
        self.last = 0.0
        if quiet:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        cols = [TextColumn("[bold]gen"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn()]
        self.bar = Progress(*cols, console=console, transient=False)
        self.task = self.bar.add_task("gen", total=total, info="")

    def __enter__(self) -> Display:
        if self.bar:
            self.bar.start()
        return self

    def update(self, p: Progress, force: bool = False) -> None:
        self.p = p
        now = time.perf_counter()
        if not self.bar or (now - self.last < 0.2 and not force):
            return
        self.last = now
        el = max(now - p.started, 1e-9)
        tps = p.tokens / p.steps if p.steps else 0.0
        info = f"{p.tokens / el:,.0f} tok/s  {tps:.2f} tok/step  skipped {p.skipped}  rejected {p.rejected}"
        if p.stopping:
            info += "  [yellow]stopping…"
        self.bar.update(self.task, completed=p.rows + p.skipped + p.rejected, info=info)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.bar:
            if exc_type is not None:
                # An error (bad input, locked or mismatched directory) is reported as one line on
                # stderr: erase the bar instead of leaving it above the message.
                self.bar.live.transient = True
            elif getattr(self, "p", None):
                self.update(self.p, force=True)
            self.bar.stop()


def run_gen(run: GenOptions, decode: DecodeParams, placement: Placement, scale: ScaleOut) -> int:
    """The whole `twotower gen`: returns the exit code. User-fixable errors propagate (the CLI prints
    them as one line, exit 2)."""
    if scale.use_ray:  # before loading anything: a missing extra is one line, exit 2
        from ..ray_pipeline import import_ray

        import_ray()
    cfg = build(run, decode, placement, scale)
    # A task of a job array does about 1/N of the input: no total (and no ETA) rather than a wrong one.
    total = count_input_rows(run.source, run.limit) if cfg.partition is None else None
    notes = (lambda m: print(f"note: {m}", file=sys.stderr)) if not run.quiet else None
    with Display(total, run.quiet) as disp:
        if scale.use_ray:
            summary = _run_ray(cfg, run, placement, scale, disp.update, notes)
        else:
            from ..pipeline import run as run_pipeline

            summary = run_pipeline(cfg, on_result=disp.update, notes=notes)
    if run.fail_on_error and summary["rows_rejected"] and not summary["exit_code"]:
        summary["exit_code"] = EXIT_REJECTS
    print(json.dumps(summary))
    if summary.get("error"):  # a failed Ray job: what was committed stays; a rerun resumes
        print(f"error: {summary['error']}; rerun the same command to resume", file=sys.stderr)
    if summary["rows_rejected"] and not run.quiet:
        print(f"note: {summary['rows_rejected']} row(s) rejected, see {summary['errors_file']}", file=sys.stderr)
    return summary["exit_code"]
