"""The errors a user can fix, and the exit codes: plain Python, no torch, importable first.

Every layer raises its own subclass of `UserError` (ConfigError, CheckpointError, InputError,
RunDirError, ...); the CLI reports any of them as one line `error: <message>` on stderr with exit
code 2. Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a bug, or a failed Ray job (rerun to resume)
EXIT_USAGE = 2  # bad flags or unreadable input: one line on stderr
EXIT_INTERRUPTED = 3  # a signal stopped the run; rerun the same command to resume
EXIT_REJECTS = 4  # rows were rejected and --fail-on-error was given


class UserError(Exception):
    """A bad argument or input: reported as one line, exit code 2, no traceback."""


def one_line(e: BaseException) -> str:
    """The message of `e` folded onto one line (or its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__
