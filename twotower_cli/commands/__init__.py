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

__all__ = ["EXIT_USAGE", "UserError", "one_line", "user_error_types", "user_errors"]

# User-fixable errors of other layers that do not derive from `UserError` yet (module, class name).
# Looked up in sys.modules, never imported: an instance of a class whose module was never imported
# cannot exist, and importing model/ just to ask would import torch.
_NOT_YET_USER_ERRORS = (
    ("twotower_cli.model.checkpoint", "CheckpointError"),
    ("twotower_cli.io.schema", "InputError"),
    ("twotower_cli.io.manifest", "RunDirError"),
    ("twotower_cli.io.rundir", "RunDirError"),
    ("twotower_cli.ray_pipeline", "RayUnavailable"),
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """`UserError` and the user-fixable error classes of the modules imported so far."""
    types: list[type[BaseException]] = [UserError]
    for module, name in _NOT_YET_USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, UserError):
            types.append(cls)
    return tuple(types)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report user-fixable errors as `error: <message>` on stderr and exit with code 2."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, user_error_types()):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
