"""The `twotower` command line: declares options, calls `commands.<name>.run`. Nothing else here.

Data goes to stdout, progress and logs to stderr. Exit codes: 0 ok, 2 bad arguments or inputs
(one line on stderr), 1 unexpected failure.
"""

from __future__ import annotations

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


def main() -> None:
    app()
