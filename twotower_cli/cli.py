"""The `twotower` command line: declares options, calls `commands.<name>.run`. Nothing else here.

Data goes to stdout, progress and logs to stderr. Exit codes: 0 ok, 2 bad arguments or inputs
(one line on stderr), 1 unexpected failure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .commands import user_errors

app = typer.Typer(
    name="twotower",
    help="Batch synthetic-data generation with TwoTower block-diffusion language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a plain traceback for real bugs, never locals (tensors)
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Keeps `twotower` a command group even while it has a single command."""


@app.command()
def info(
    path: Annotated[
        Path | None,
        typer.Argument(help="Checkpoint directory (default: the embedded tiny model).", show_default=False),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Describe a preset config instead (e.g. nemotron-3-nano-30b-a3b); no weights."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Layer pattern, parameter counts per tower and in total, active parameters per token."""
    from .commands import info as cmd

    with user_errors():
        cmd.run(path, preset, as_json)


@app.command(no_args_is_help=True)
def gen(
    source: Annotated[str, typer.Argument(help="Prompts: a JSONL or Parquet file, or - for stdin.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory (Parquet shards; resumable).")],
    model: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: the embedded tiny model).",
                                               show_default=False)] = None,
    mode: Annotated[str, typer.Option(help="diffusion | mock-ar | ar")] = "diffusion",
    gamma: Annotated[float, typer.Option(help="Confidence threshold γ in [0, 1]: lower commits more tokens "
                                              "per step (faster, lower quality).")] = 0.8,
    block: Annotated[int, typer.Option(help="Block size S (tokens denoised together).")] = 16,
    steps: Annotated[int, typer.Option(help="Denoiser steps per block T (at most).")] = 16,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples (per-row noise keyed by seed).")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per row.")] = 128,
    seed: Annotated[int, typer.Option(help="Sampling seed (rows may override).")] = 0,
    mask_token_id: Annotated[int, typer.Option(help="The mask token id of the checkpoint.")] = 3,
    device: Annotated[str | None, typer.Option(help="Device for both towers (cpu, cuda, cuda:1).")] = None,
    ctx_device: Annotated[str | None, typer.Option(help="Device of the context tower.")] = None,
    den_device: Annotated[str | None, typer.Option(help="Device of the denoiser tower.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Weight dtype (default: float32 on CPU, the "
                                                   "checkpoint's on CUDA).")] = None,
    max_batch_rows: Annotated[int, typer.Option(min=1, help="Rows decoded together.")] = 32,
    max_batch_tokens: Annotated[int, typer.Option(min=1, help="Padded prompt tokens per batched prefill.")] = 16384,
    rows_per_shard: Annotated[int, typer.Option(min=1, help="Rows per Parquet shard.")] = 10_000,
    prompt_field: Annotated[str, typer.Option(help="Prompt column of a Parquet input.")] = "prompt",
    id_field: Annotated[str, typer.Option(help="Id column of a Parquet input.")] = "id",
    limit: Annotated[int | None, typer.Option(min=0, help="Read at most this many input rows.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in an output directory written with "
                                                 "other settings (deletes its shards).")] = False,
    fail_on_error: Annotated[bool, typer.Option(help="Exit 4 when any row was rejected.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    num_shards: Annotated[int | None, typer.Option(
        help="Job arrays: split the input into N disjoint shards by id hash; every task writes the same "
             "-o directory (with --shard-index).", rich_help_panel="Scale-out")] = None,
    shard_index: Annotated[int | None, typer.Option(
        help="The shard this task writes, 0..N-1 (e.g. $SLURM_ARRAY_TASK_ID).", rich_help_panel="Scale-out")] = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Run the engine on Ray actors (Ray Data; needs the `ray` extra).",
        rich_help_panel="Scale-out")] = False,
    ray_address: Annotated[str | None, typer.Option(
        help="Ray cluster to join (implies --ray): auto, HOST:PORT or ray://HOST:10001. Default: $RAY_ADDRESS, "
             "else a local Ray instance.", rich_help_panel="Scale-out")] = None,
    ray_actors: Annotated[int | None, typer.Option(
        min=1, help="Ray actors (model replicas). Default: autoscale to the cluster.",
        rich_help_panel="Scale-out", show_default=False)] = None,
    ray_cpus: Annotated[float, typer.Option(
        min=0.0, help="CPUs reserved per Ray actor; also its torch threads (at least 1).",
        rich_help_panel="Scale-out")] = 1.0,
    ray_batch_rows: Annotated[int | None, typer.Option(
        min=1, help="Rows per Ray actor call. Default: 4 x --max-batch-rows.", rich_help_panel="Scale-out",
        show_default=False)] = None,
) -> None:
    """Generate completions for every prompt; resumes where an earlier run of the same command stopped.

    Exit codes: 0 done, 1 failed (e.g. a Ray job; rerun to resume), 2 bad flags or unreadable input,
    3 interrupted (rerun to resume), 4 rows rejected with --fail-on-error. The JSON summary goes to stdout.
    """
    from .commands import gen as cmd

    opts = dict(locals())
    with user_errors():
        code = cmd.run_gen(source, out, model, opts)
    raise typer.Exit(code)


@app.command(no_args_is_help=True)
def stats(
    out_dir: Annotated[Path, typer.Argument(help="An output directory of `twotower gen`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Rows, per-mode counts, finish reasons, tokens-per-step histogram and throughput of a run."""
    from .commands import stats as cmd

    with user_errors():
        cmd.run(out_dir, as_json)


@app.command()
def bench(
    model: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: the embedded tiny model).",
                                               show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per (mode, γ) on stdout.")] = False,
    n_per_task: Annotated[int, typer.Option(min=1, help="Held-out prompts per task.")] = 20,
    batch: Annotated[int, typer.Option(min=1, help="Rows decoded together (1 = latency-bound, as the "
                                                   "release's speed-up figure).")] = 1,
    gammas: Annotated[str, typer.Option(help="Comma-separated γ values for diffusion.")] = "0.5,0.6,0.7,0.8,0.9,0.95",
    block: Annotated[int, typer.Option(min=1, help="Block size S.")] = 16,
    steps: Annotated[int, typer.Option(min=1, help="Steps per block T.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per row.")] = 64,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: torch's).")] = None,
    seed: Annotated[int, typer.Option(help="Which held-out sample to draw.")] = 0,
    rounds: Annotated[int, typer.Option(min=1, help="Timed passes over all configurations, interleaved; "
                                                    "tokens/s is each one's median (outputs are identical "
                                                    "every pass).")] = 3,
) -> None:
    """AR vs mock-AR vs diffusion at several γ on held-out tasks: exact match, quality vs AR,
    tokens per denoiser step, tokens/s and speed-up vs AR, measured in one run."""
    from .commands import bench as cmd

    with user_errors():
        try:
            gs = tuple(float(g) for g in gammas.split(",") if g.strip())
        except ValueError:
            raise cmd.UserError(f"--gammas must be comma-separated numbers, got {gammas!r}") from None
        if not gs or any(not 0.0 <= g <= 1.0 for g in gs):
            raise cmd.UserError("--gammas must be numbers in [0, 1]")
        cmd.run(model, as_json, n_per_task, batch, gs, block, steps, max_new_tokens, threads, seed, rounds)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # before a run installs its own handlers (e.g. while loading a model)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
