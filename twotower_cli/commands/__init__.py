"""One module per CLI command: `cli.py` declares the options and calls `run(...)` here.

Command bodies print data to stdout and logs to stderr, and raise `errors.UserError` (or a
subclass) for anything the user can fix; `cli.py` turns those into one line on stderr and exit
code 2. Nothing here imports torch or the model: command modules import what they need inside the
functions that need it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from ..errors import EXIT_USAGE, UserError, one_line

__all__ = ["EXIT_USAGE", "UserError", "one_line", "user_errors"]

@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report user-fixable errors as `error: <message>` on stderr and exit with code 2."""
    try:
        yield
    except UserError as e:  # every layer's user-fixable errors derive from it
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
