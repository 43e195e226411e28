"""The CLI's options, declared once, and the typed objects `cli.py` hands to the command bodies.

Torch-free: `twotower --help` imports this and nothing heavier than typer and rich.

- `Annotated` aliases for options that more than one command takes (`--model`, `--block-size`,
  `--steps-per-block`, `--max-new-tokens`, `--threads`, ...) carry their name, metavar, help text
  and help panel; a command gives only its default.
- `GenOptions` (input/output and batching), `Placement` (model and devices) and `ScaleOut` (job
  arrays, Ray) group `twotower gen`'s non-decoding flags; the decoding flags build a
  `config.DecodeParams`, which checks their ranges (the one place they are checked).
- `HelpCommand` renders a command's --help: option names whole (`--overwrite/--no-overwrite`),
  the help text wrapped beside them, one panel per group, at any width from 80 columns.
"""

from __future__ import annotations

import inspect
import io
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from .errors import UserError

# ---- help panels ----------------------------------------------------------------------------------

DECODING = "Decoding"
MODEL = "Model & devices"
IO = "Input/Output"
SCALE_OUT = "Scale-out"
BENCH = "Benchmark"

# ---- defaults ------------------------------------------------------------------------------------

# Torch CPU threads of `gen` (--threads) and of each Ray actor (--ray-cpus), capped at the CPUs
# this process may use. Measured on the embedded model (README, "Threads"): one thread is as fast
# as two on an idle 2-core machine and several times faster when another process keeps a core
# busy (OpenMP threads spin against each other); a big model on a big machine wants more: --threads.
DEFAULT_THREADS = 1
FORMATS = ("parquet", "jsonl", "openai")
DEFAULT_LOG_EVERY_S = 30.0

# ---- options shared by commands ---------------------------------------------------------------------

Model = Annotated[Path | None, typer.Option(
    "--model", metavar="DIR", show_default=False, rich_help_panel=MODEL,
    help="Checkpoint directory (default: the embedded tiny model).")]
Threads = Annotated[int | None, typer.Option(
    "--threads", metavar="N", min=1, max=4096, show_default=False, rich_help_panel=MODEL,
    help=f"Torch CPU threads of this process (default: {DEFAULT_THREADS}, at most the CPUs available; "
         "raise it for a big model on an idle many-core machine).")]
BlockSize = Annotated[int, typer.Option(
    "--block-size", "--block", metavar="S", rich_help_panel=DECODING,
    help="Block size S: tokens denoised together.")]
StepsPerBlock = Annotated[int, typer.Option(
    "--steps-per-block", "--steps", metavar="T", rich_help_panel=DECODING,
    help="Denoiser steps per block T (at most).")]
MaxNewTokens = Annotated[int, typer.Option(
    "--max-new-tokens", metavar="N", rich_help_panel=DECODING, help="Most tokens generated per row.")]

# ---- `twotower gen` ---------------------------------------------------------------------------------

Source = Annotated[str, typer.Argument(
    metavar="SOURCE", show_default=False, help="Prompts: a JSONL or Parquet file, or - for stdin.")]
Out = Annotated[str, typer.Option(
    "--out", "-o", metavar="DIR", rich_help_panel=IO,
    help="Output directory (shards in --format; resumable), or - to stream rows to stdout as JSON "
         "lines (the output columns, in completion order, flushed per row; the summary goes to "
         "stderr; no resume). A directory named - is ./-.")]
ArScore = Annotated[bool | None, typer.Option(
    "--ar-score/--no-ar-score", rich_help_panel=DECODING, show_default=False,
    help="Score every row with the context tower (ar_logprob, ar_agreement columns). Default: AR "
         "and speculative rows only, where it is free; it costs diffusion rows ~15-20% throughput.")]
Mode = Annotated[str, typer.Option(
    "--mode", metavar="MODE", rich_help_panel=DECODING,
    help="Decoding mode: diffusion, mock-ar, ar or speculative (AR's exact output, faster).")]
Gamma = Annotated[float, typer.Option(
    "--gamma", metavar="GAMMA", rich_help_panel=DECODING,
    help="Confidence threshold γ in [0, 1]: lower commits more tokens per step (faster, lower quality).")]
Temperature = Annotated[float, typer.Option(
    "--temperature", metavar="TEMP", rich_help_panel=DECODING,
    help="Sampling temperature: 0 is greedy, above 0 samples (per-row noise keyed by the seed).")]
Seed = Annotated[int, typer.Option(
    "--seed", metavar="N", rich_help_panel=DECODING, help="Sampling seed (rows may override it).")]
TopK = Annotated[int, typer.Option(
    "--top-k", metavar="K", rich_help_panel=DECODING,
    help="Sample only among the K most likely tokens (0: off; temperature > 0 only).")]
TopP = Annotated[float, typer.Option(
    "--top-p", metavar="P", rich_help_panel=DECODING,
    help="Sample only within the smallest set of tokens of probability mass P (1: off).")]
MinP = Annotated[float, typer.Option(
    "--min-p", metavar="P", rich_help_panel=DECODING,
    help="Sample only tokens at least P times as likely as the most likely one (0: off).")]
Stop = Annotated[list[str] | None, typer.Option(
    "--stop", metavar="STR", show_default=False, rich_help_panel=DECODING,
    help="End a completion before this string (repeatable; rows may set their own `stop`). "
         "finish_reason is then `stop`.")]
Samples = Annotated[int, typer.Option(
    "--n", metavar="K", rich_help_panel=DECODING,
    help="Samples per prompt, each its own output row (sample_index 0..K-1, its own seed; needs a "
         "temperature > 0). Rows may set their own `n`.")]
MaskTokenId = Annotated[int, typer.Option(
    "--mask-token-id", metavar="ID", rich_help_panel=DECODING, help="The mask token id of the checkpoint.")]
Device = Annotated[str | None, typer.Option(
    "--device", metavar="DEV", show_default=False, rich_help_panel=MODEL,
    help="Device of both towers (cpu, cuda, cuda:1).")]
CtxDevice = Annotated[str | None, typer.Option(
    "--ctx-device", metavar="DEV", show_default=False, rich_help_panel=MODEL, help="Device of the context tower.")]
DenDevice = Annotated[str | None, typer.Option(
    "--den-device", metavar="DEV", show_default=False, rich_help_panel=MODEL,
    help="Device of the denoiser tower.")]
Dtype = Annotated[str | None, typer.Option(
    "--dtype", metavar="DTYPE", show_default=False, rich_help_panel=MODEL,
    help="Weight dtype (default: float32 on CPU, the checkpoint's on CUDA).")]
MaxBatchRows = Annotated[int, typer.Option(
    "--max-batch-rows", metavar="N", min=1, max=65536, rich_help_panel=MODEL, help="Rows decoded together.")]
MaxBatchTokens = Annotated[int, typer.Option(
    "--max-batch-tokens", metavar="N", min=1, rich_help_panel=MODEL,
    help="Padded prompt tokens per batched prefill.")]
RowsPerShard = Annotated[int, typer.Option(
    "--rows-per-shard", metavar="N", min=1, rich_help_panel=IO, help="Rows per Parquet shard.")]
PromptField = Annotated[str, typer.Option(
    "--prompt-field", metavar="NAME", rich_help_panel=IO, help="Prompt column of a Parquet input.")]
IdField = Annotated[str, typer.Option(
    "--id-field", metavar="NAME", rich_help_panel=IO, help="Id column of a Parquet input.")]
Limit = Annotated[int | None, typer.Option(
    "--limit", metavar="N", min=0, show_default=False, rich_help_panel=IO,
    help="Read at most this many input rows (default: all).")]
OutputFormat = Annotated[str | None, typer.Option(
    "--format", metavar="FMT", show_default=False, rich_help_panel=IO,
    help="Rows as parquet (default), jsonl, or openai (OpenAI batch output lines): the shards of "
         "the output directory, or the lines of -o - (jsonl by default there).")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite/--no-overwrite", rich_help_panel=IO,
    help="Start over in an output directory written with other settings (deletes its shards).")]
RegenerateChanged = Annotated[bool, typer.Option(
    "--regenerate-changed/--no-regenerate-changed", rich_help_panel=IO,
    help="On resume, decode again the rows whose input changed under their id (their old rows are "
         "removed from the shards first). Default: keep them and log each.")]
FailOnError = Annotated[bool, typer.Option(
    "--fail-on-error/--no-fail-on-error", rich_help_panel=IO, help="Exit 4 when any row was rejected.")]
Quiet = Annotated[bool, typer.Option(
    "--quiet/--no-quiet", "-q", rich_help_panel=IO,
    help="No progress display, no notes and no library warnings on stderr.")]
LogEvery = Annotated[float, typer.Option(
    "--log-every", metavar="SECONDS", min=0.01, rich_help_panel=IO,
    help="When stderr is not a terminal (cron, a log file): one progress line this often, and at "
         "the end.")]
NumShards = Annotated[int | None, typer.Option(
    "--num-shards", metavar="N", show_default=False, rich_help_panel=SCALE_OUT,
    help="Job arrays: split the input into N disjoint shards by id hash; every task writes the same "
         "-o directory (with --shard-index).")]
ShardIndex = Annotated[int | None, typer.Option(
    "--shard-index", metavar="I", show_default=False, rich_help_panel=SCALE_OUT,
    help="The shard this task writes, 0..N-1 (e.g. $SLURM_ARRAY_TASK_ID).")]
Ray = Annotated[bool, typer.Option(
    "--ray", rich_help_panel=SCALE_OUT, help="Run the engine on Ray actors (Ray Data; needs the `ray` extra).")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", metavar="ADDR", show_default=False, rich_help_panel=SCALE_OUT,
    help="Ray cluster to join (implies --ray): auto, HOST:PORT or ray://HOST:10001 (default: $RAY_ADDRESS, "
         "else a local Ray instance).")]
RayActors = Annotated[int | None, typer.Option(
    "--ray-actors", metavar="N", min=1, show_default=False, rich_help_panel=SCALE_OUT,
    help="Ray actors, i.e. model replicas (default: autoscale to the cluster).")]
RayCpus = Annotated[float | None, typer.Option(
    "--ray-cpus", metavar="N", min=0.0, show_default=False, rich_help_panel=SCALE_OUT,
    help=f"CPUs reserved per Ray actor; also its torch threads (at least 1; default: {DEFAULT_THREADS}, "
         "as --threads).")]
RayBatchRows = Annotated[int | None, typer.Option(
    "--ray-batch-rows", metavar="N", min=1, show_default=False, rich_help_panel=SCALE_OUT,
    help="Rows per Ray actor call (default: 4 x --max-batch-rows).")]


@dataclass(frozen=True)
class GenOptions:
    """`twotower gen`: where rows come from and go, and how they are batched."""

    source: str
    out: Path
    max_batch_rows: int = 32
    max_batch_tokens: int = 16384
    rows_per_shard: int = 10_000
    prompt_field: str = "prompt"
    id_field: str = "id"
    limit: int | None = None
    overwrite: bool = False
    fail_on_error: bool = False
    quiet: bool = False
    ar_score: bool | None = None  # None: where it is free (AR, speculative rows)
    log_every: float = DEFAULT_LOG_EVERY_S  # no terminal: a progress line this often (seconds)
    format: str | None = None  # parquet, jsonl, openai (None: parquet, or jsonl with -o -)
    regenerate_changed: bool = False

    def __post_init__(self) -> None:
        if not str(self.source):
            raise UserError("SOURCE is empty: give a file, or - for stdin")
        if isinstance(self.out, str):  # from the command line: '' is an unset variable, not '.'
            if not self.out:
                raise UserError("-o is empty (an unset shell variable?): give a directory, or - for stdout")
            if "\x00" in self.out:
                raise UserError("-o holds a null byte: no file name can")
            object.__setattr__(self, "out", Path(self.out))
        if self.format is not None and self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.format == "parquet" and str(self.out) == "-":
            raise UserError("-o - streams lines: use --format jsonl or openai (Parquet needs a file)")

    @property
    def output_format(self) -> str:
        return self.format or ("jsonl" if str(self.out) == "-" else "parquet")


@dataclass(frozen=True)
class Placement:
    """Which checkpoint, on which devices, in which dtype, with how many CPU threads."""

    model: Path | None = None  # None: the embedded model
    device: str | None = None
    ctx_device: str | None = None
    den_device: str | None = None
    dtype: str | None = None
    threads: int | None = None


@dataclass(frozen=True)
class ScaleOut:
    """Job-array partitioning and Ray."""

    num_shards: int | None = None
    shard_index: int | None = None
    ray: bool = False
    ray_address: str | None = None
    ray_actors: int | None = None
    ray_cpus: float | None = None  # None: the --threads default
    ray_batch_rows: int | None = None

    @property
    def use_ray(self) -> bool:
        return bool(self.ray or self.ray_address)


# ---- --help ---------------------------------------------------------------------------------------

PANEL_ORDER = ("Arguments", DECODING, MODEL, IO, SCALE_OUT, BENCH, "Commands", "Options")


def _names(record: str) -> str:
    """click's `--x / --no-x` and `-q, --quiet / --no-quiet` as `--x/--no-x`, `-q, --quiet/--no-quiet`."""
    return record.replace(" / ", "/")


def _paragraphs(text: str | None) -> list[str]:
    """A docstring's paragraphs, each on one line (the console wraps them)."""
    return [" ".join(p.split()) for p in inspect.cleandoc(text or "").split("\n\n") if p.strip()]


def _arg_usage(param) -> str:
    name = param.metavar or (param.name or "").upper()
    name += "..." if param.nargs != 1 else ""
    return name if param.required else f"[{name}]"


def _render_help(ctx, usage: str, text: str | None, panels: dict[str, list[tuple[str, str]]]) -> str:
    """Usage line, the description, then one panel per group of (names, help) rows."""
    from rich import box
    from rich.console import Console
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    width = ctx.terminal_width or shutil.get_terminal_size((80, 24)).columns
    width = max(60, min(width, ctx.max_content_width or 100))
    color = ctx.color if ctx.color is not None else sys.stdout.isatty()
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=color, color_system="standard" if color else None,
                      highlight=False, emoji=False, markup=False)
    console.print(Padding(Text.assemble("Usage: ", (usage, "bold")), (0, 1)))
    console.print()
    for para in _paragraphs(text):
        console.print(Padding(Text(para), (0, 1)))
        console.print()
    order = [*[p for p in PANEL_ORDER if p in panels], *[p for p in panels if p not in PANEL_ORDER]]
    for name in order:
        table = Table(box=None, show_header=False, expand=True, padding=(0, 1), pad_edge=False)
        table.add_column(no_wrap=True, style="bold cyan")
        table.add_column(ratio=1, overflow="fold")
        for names, help_text in panels[name]:
            table.add_row(names, help_text)
        console.print(Panel(table, title=name, title_align="left", box=box.ROUNDED, border_style="dim"))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def _param_panels(command, ctx) -> dict[str, list[tuple[str, str]]]:
    panels: dict[str, list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        if param.param_type_name == "argument":
            panel, names = "Arguments", _arg_usage(param)
        else:
            panel = getattr(param, "rich_help_panel", None) or "Options"
        panels.setdefault(panel, []).append((_names(names), help_text))
    return panels


class HelpCommand(TyperCommand):
    """A command whose --help keeps every option name whole: a two-column table per panel (names and
    metavar, then the help text wrapped beside them) instead of typer's six columns, which at 80
    columns cut names such as `--max-batch-tokens` short."""

    def format_help(self, ctx, formatter) -> None:
        pieces = ["[OPTIONS]" if any(p.param_type_name == "option" for p in self.get_params(ctx)) else ""]
        pieces += [_arg_usage(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]
        usage = " ".join([ctx.command_path, *filter(None, pieces)])
        formatter.write(_render_help(ctx, usage, self.help, _param_panels(self, ctx)))


class HelpGroup(TyperGroup):
    """`twotower --help` in the same layout as the commands' help."""

    def format_help(self, ctx, formatter) -> None:
        panels = _param_panels(self, ctx)
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, (_paragraphs(cmd.short_help or cmd.help) or [""])[0]))
        if rows:
            panels["Commands"] = rows
        usage = f"{ctx.command_path} [OPTIONS] COMMAND [ARGS]..."
        formatter.write(_render_help(ctx, usage, self.help, panels))
