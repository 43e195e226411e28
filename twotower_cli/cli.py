"""The `twotower` command line: declares commands, builds typed options, calls `commands.<name>`.

Options are declared once in `options.py`. Data goes to stdout, progress and logs to stderr. Exit
codes: 0 ok, 2 bad arguments or inputs (one line on stderr, flag-parse errors included), 3
interrupted by a signal, 1 unexpected failure. Nothing here imports torch: `twotower --help` stays
fast, and command modules import it when they run.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

from . import options as o
from .commands import user_errors
from .config import DecodeParams
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

# The click that typer runs on: its own vendored copy in recent typer, the click package before.
_click: Any = getattr(typer.core, "_click", None)
if _click is None:  # pragma: no cover - older typer
    import click as _click
_UsageError = _click.exceptions.UsageError
_ClickException = _click.exceptions.ClickException
_NoArgsIsHelp = getattr(_click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2; before, help exits 0 itself

INTERRUPTED = "interrupted: rows committed so far are kept; rerun the same command to resume"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Interrupted(BaseException):
    """SIGINT/SIGTERM outside a run's own handlers (start-up: imports, flag checks, opening the
    output directory; the end: the summary). A BaseException, so that no `except Exception` and
    neither click nor typer (which turn KeyboardInterrupt into "Aborted!", exit 1, or exit 130)
    swallows it."""


@contextlib.contextmanager
def _keyboard_interrupt_is_interrupted() -> Iterator[None]:
    """A KeyboardInterrupt (the default SIGINT handler, e.g. in-process callers) becomes
    `_Interrupted` before typer can turn it into exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        raise _Interrupted(signal.SIGINT) from None


class Root(o.HelpGroup):
    """The root group: whatever happens, one exit code and at most one line on stderr.

    A flag that does not parse (unknown, missing, of the wrong type) is `error: <what>; see
    '<command> --help'` with exit 2, not click's boxed usage text; no arguments at all show the
    help (stdout, exit 0); a signal before a run has its own handlers is the "interrupted" line,
    exit 3. In-process callers (typer's CliRunner) get the same as the command line."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _keyboard_interrupt_is_interrupted():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _keyboard_interrupt_is_interrupted():
            return super().invoke(ctx)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as e:
            typer.echo(e.ctx.get_help(), color=e.ctx.color)
            code = EXIT_OK
        except _UsageError as e:
            print(f"error: {usage_line(e)}", file=sys.stderr, flush=True)
            code = EXIT_USAGE
        except _ClickException as e:
            print(f"error: {_fold(e.format_message())}", file=sys.stderr, flush=True)
            code = e.exit_code
        except typer.Abort as e:
            if not isinstance(e.__cause__, KeyboardInterrupt):
                print("error: aborted", file=sys.stderr, flush=True)
                code = EXIT_FAILED
            else:
                print(INTERRUPTED, file=sys.stderr, flush=True)
                code = EXIT_INTERRUPTED
        except _Interrupted:
            print(INTERRUPTED, file=sys.stderr, flush=True)
            code = EXIT_INTERRUPTED
        code = code if isinstance(code, int) else EXIT_OK  # a command that returned normally: None
        if standalone_mode:
            sys.exit(code)
        return code


def _fold(text: str) -> str:
    return " ".join(text.split())


def usage_line(e: Any) -> str:
    """click's message on one line, lower-cased like ours, then where the help is."""
    msg = _fold(e.format_message()).rstrip(".")
    if msg[:1].isupper() and msg[1:2].islower():
        msg = msg[0].lower() + msg[1:]
    where = e.ctx.command_path if e.ctx is not None else "twotower"
    return f"{msg}; see '{where} --help'"


app = typer.Typer(
    name="twotower",
    cls=Root,
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
    """Batch synthetic-data generation with TwoTower block-diffusion language models."""


@app.command(cls=o.HelpCommand)
def info(
    path: Annotated[Path | None, typer.Argument(
        metavar="DIR", show_default=False,
        help="Checkpoint directory (default: the embedded tiny model).")] = None,
    preset: Annotated[str | None, typer.Option(
        metavar="NAME", show_default=False,
        help="Describe a preset config instead, e.g. nemotron-3-nano-30b-a3b (no weights needed).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Layer pattern, parameter counts per tower and in total, active parameters per token."""
    from .commands import info as cmd

    with user_errors():
        cmd.run(path, preset, as_json)


@app.command(cls=o.HelpCommand, no_args_is_help=True)
def gen(
    source: o.Source,
    out: o.Out,
    model: o.Model = None,
    mode: o.Mode = "diffusion",
    gamma: o.Gamma = 0.8,
    block_size: o.BlockSize = 16,
    steps_per_block: o.StepsPerBlock = 16,
    temperature: o.Temperature = 0.0,
    max_new_tokens: o.MaxNewTokens = 128,
    seed: o.Seed = 0,
    top_k: o.TopK = 0,
    top_p: o.TopP = 1.0,
    min_p: o.MinP = 0.0,
    stop: o.Stop = None,
    n: o.Samples = 1,
    mask_token_id: o.MaskTokenId = 3,
    ar_score: o.ArScore = None,
    device: o.Device = None,
    ctx_device: o.CtxDevice = None,
    den_device: o.DenDevice = None,
    dtype: o.Dtype = None,
    threads: o.Threads = None,
    max_batch_rows: o.MaxBatchRows = 32,
    max_batch_tokens: o.MaxBatchTokens = 16384,
    rows_per_shard: o.RowsPerShard = 10_000,
    prompt_field: o.PromptField = "prompt",
    id_field: o.IdField = "id",
    limit: o.Limit = None,
    output_format: o.OutputFormat = None,
    overwrite: o.Overwrite = False,
    regenerate_changed: o.RegenerateChanged = False,
    fail_on_error: o.FailOnError = False,
    quiet: o.Quiet = False,
    log_every: o.LogEvery = o.DEFAULT_LOG_EVERY_S,
    num_shards: o.NumShards = None,
    shard_index: o.ShardIndex = None,
    ray: o.Ray = False,
    ray_address: o.RayAddress = None,
    ray_actors: o.RayActors = None,
    ray_cpus: o.RayCpus = None,
    ray_batch_rows: o.RayBatchRows = None,
) -> None:
    """Generate completions for every prompt; resumes where an earlier run of the same command stopped
    (a rerun with nothing left exits 0 at once, without loading the model).

    Exit codes: 0 done, 1 failed (e.g. a Ray job; rerun to resume), 2 bad flags or unreadable input,
    3 interrupted (rerun to resume), 4 rows rejected with --fail-on-error. The JSON summary goes to
    stdout (to stderr with -o -, whose rows stream to stdout as JSON lines and do not resume).
    """
    from .commands import gen as cmd

    with user_errors():
        decode = DecodeParams(mode=mode, gamma=gamma, block_size=block_size, steps_per_block=steps_per_block,
                              temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                              mask_token_id=mask_token_id, top_k=top_k, top_p=top_p, min_p=min_p,
                              stop=tuple(stop or ()), n=n)
        run = o.GenOptions(source=source, out=out, max_batch_rows=max_batch_rows,
                           max_batch_tokens=max_batch_tokens, rows_per_shard=rows_per_shard,
                           prompt_field=prompt_field, id_field=id_field, limit=limit, overwrite=overwrite,
                           fail_on_error=fail_on_error, quiet=quiet, ar_score=ar_score, log_every=log_every,
                           format=output_format, regenerate_changed=regenerate_changed)
        placement = o.Placement(model=model, device=device, ctx_device=ctx_device, den_device=den_device,
                                dtype=dtype, threads=threads)
        scale = o.ScaleOut(num_shards=num_shards, shard_index=shard_index, ray=ray, ray_address=ray_address,
                           ray_actors=ray_actors, ray_cpus=ray_cpus, ray_batch_rows=ray_batch_rows)
        code = cmd.run_gen(run, decode, placement, scale)
    raise typer.Exit(code)


@app.command(cls=o.HelpCommand, no_args_is_help=True)
def stats(
    out_dir: Annotated[Path, typer.Argument(
        metavar="DIR", show_default=False, help="An output directory of `twotower gen`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Rows, per-mode counts, finish reasons, tokens-per-step histogram and throughput of a run."""
    from .commands import stats as cmd

    with user_errors():
        cmd.run(out_dir, as_json)


@app.command(cls=o.HelpCommand)
def bench(
    model: o.Model = None,
    gammas: Annotated[str, typer.Option(
        metavar="LIST", rich_help_panel=o.DECODING,
        help="Comma-separated γ values for diffusion.")] = "0.5,0.6,0.7,0.8,0.9,0.95",
    spec_gammas: Annotated[str, typer.Option(
        metavar="LIST", rich_help_panel=o.DECODING,
        help="Comma-separated γ values for speculative decoding (its drafts' threshold; the output is AR's "
             "at every γ).")] = "0.5,0.8,0.95",
    block_size: o.BlockSize = 16,
    steps_per_block: o.StepsPerBlock = 16,
    max_new_tokens: o.MaxNewTokens = 64,
    batch: Annotated[str, typer.Option(
        metavar="LIST", rich_help_panel=o.MODEL,
        help="Comma-separated batch sizes (rows decoded together), each measured on its own with AR as "
             "its baseline; 1 is latency-bound, as the release's speed-up figure.")] = "1",
    threads: o.Threads = None,
    n_per_task: Annotated[int, typer.Option(
        metavar="N", min=1, rich_help_panel=o.BENCH, help="Held-out prompts per task.")] = 20,
    seed: Annotated[int, typer.Option(
        metavar="N", rich_help_panel=o.BENCH, help="Which held-out prompts to draw.")] = 0,
    rounds: Annotated[int, typer.Option(
        metavar="N", min=1, rich_help_panel=o.BENCH,
        help="Timed passes over all configurations, interleaved; tokens/s is each one's median pass "
             "(outputs are identical every pass).")] = 3,
    as_json: Annotated[bool, typer.Option(
        "--json", rich_help_panel=o.BENCH,
        help="Print one JSON object per (batch, mode, γ) instead of a table.")] = False,
) -> None:
    """AR vs speculative vs mock-AR vs diffusion at several γ on held-out tasks, at each batch size:
    exact match, quality vs AR, share of rows equal to AR's, tokens per step, accepted tokens per verify
    (speculative), tokens/s and speed-up vs AR of the same batch size, measured in one run."""
    from .commands import bench as cmd

    with user_errors():
        decode = DecodeParams(block_size=block_size, steps_per_block=steps_per_block, max_new_tokens=max_new_tokens)
        cmd.run(model, decode, cmd.parse_gammas(gammas), cmd.parse_gammas(spec_gammas, "--spec-gammas"),
                as_json=as_json, n_per_task=n_per_task, batches=cmd.parse_batches(batch), threads=threads,
                seed=seed, rounds=rounds)


def _on_signal(signum: int, frame: object) -> None:
    if _on_signal.fired:  # type: ignore[attr-defined]
        return  # already stopping, or already finished: the exit code is decided
    _on_signal.fired = True  # type: ignore[attr-defined]
    raise _Interrupted(signum)


_on_signal.fired = False  # type: ignore[attr-defined]


def _forget_caught_keyboard_interrupts() -> None:
    """CPython remembers a KeyboardInterrupt that escaped code run by exec() of a *string*
    (dataclasses, namedtuple and typing build their methods that way, and torch's import runs a lot
    of them) even when a caller caught it afterwards, and at exit then kills the process with
    SIGINT (-2, 130 in a shell) instead of exiting with its code: a signal that landed there while
    the model loaded made the run exit -2 after its "interrupted" line. exec() of a string forgets
    it when it completes; so does this, just before the exit."""
    exec("pass")  # noqa: S102 - a constant string: the point is the interpreter's bookkeeping


def main() -> None:
    # First: a signal at any moment of start-up (before torch and the model load) is exit 3, one
    # line. A run replaces these handlers with its own while it reads, loads and generates.
    _on_signal.fired = False  # type: ignore[attr-defined]
    for s in _SIGNALS:
        signal.signal(s, _on_signal)
    try:
        try:
            app(prog_name="twotower")
        finally:
            _on_signal.fired = True  # type: ignore[attr-defined]  # from here on a signal changes nothing
    except (_Interrupted, KeyboardInterrupt):  # a signal between the command's end and here
        print(INTERRUPTED, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        _forget_caught_keyboard_interrupts()
