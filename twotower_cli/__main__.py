"""`python -m twotower_cli` is the `twotower` command."""

import signal
import sys


def _early(signum: int, frame: object) -> None:
    """A signal while the command's modules import (before `main` installs its handlers)."""
    print("interrupted: rows committed so far are kept; rerun the same command to resume", file=sys.stderr)
    raise SystemExit(3)  # errors.EXIT_INTERRUPTED, not imported yet: this runs before any import


for _s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_s, _early)

from .cli import main  # noqa: E402 - after the handlers, so that start-up is covered from its first line

if __name__ == "__main__":
    main()
