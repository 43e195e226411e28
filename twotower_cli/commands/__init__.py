"""One module per CLI command: `cli.py` declares the options and calls `run(...)` here.

Command bodies print data to stdout and logs to stderr, and raise `UserError` (or a library error
listed in `USER_ERRORS`) for anything the user can fix; `cli.py` turns those into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from ..config import ConfigError
from ..model.checkpoint import CheckpointError


class UserError(Exception):
    """A bad argument or input: reported as one line, exit code 2, no traceback."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, CheckpointError, ConfigError)
EXIT_USAGE = 2


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report user-fixable errors as `error: <message>` on stderr and exit with code 2."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
