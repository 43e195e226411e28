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

__all__ = ["EXIT_USAGE", "UserError", "one_line", "os_error_line", "user_errors"]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report user-fixable errors as `error: <message>` on stderr and exit with code 2.

    The last resort for faults of the environment that no layer caught: an `OSError` (a file
    that cannot be read or written: `error: <file>: <reason>`) and a name or text that is not
    valid UTF-8. Anything else is a bug and keeps its traceback (exit 1)."""
    try:
        yield
    except UserError as e:  # every layer's user-fixable errors derive from it
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    except UnicodeError as e:
        print(f"error: not valid UTF-8: {_text(one_line(e))}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None


def os_error_line(e: OSError) -> str:
    """`<file>: <reason>` (or `<file> -> <file2>: <reason>`), the file shown even when its name is
    not valid UTF-8."""
    reason = e.strerror or one_line(e)
    names = [_text(str(n)) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def _text(s: str) -> str:
    return s.encode("utf-8", "backslashreplace").decode("utf-8")
