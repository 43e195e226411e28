"""Durable files on POSIX: fsync by path, fsync of a directory entry, and atomic replacement.

The building blocks of every commit in an output directory (io.writer's shards, io.rundir's
manifest). They know nothing of the directory's names: the caller says where a temporary file goes.

`writing(path)` turns the failures a user can fix (a full disk or quota, a file-size limit, a
read-only or unwritable directory) into one `RunDirError` line naming the file; any other OSError
keeps its traceback (it is a bug or a broken machine).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

# The write failures a user can fix: reported as one line (exit 2), never a traceback.
USER_FIXABLE_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
    if e is not None
)


class RunDirError(UserError):
    """The output directory cannot be used for this run (the CLI exits 2 with this one line)."""


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Report a user-fixable write failure on `path` as a RunDirError (one line, exit 2)."""
    try:
        yield
    except OSError as e:
        if e.errno not in USER_FIXABLE_ERRNOS:
            raise
        raise RunDirError(
            f"cannot write {path}: {os.strerror(e.errno)}; the committed shards are kept: fix this "
            "(free space, raise the limit, make the directory writable) and rerun the same command to resume"
        ) from None


def fsync_path(path: Path) -> None:
    """fsync a file by path (works on a read-only fd on Linux/macOS)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename/unlink in `path` durable: on POSIX the directory entry is data of its own."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, tmp: Path) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content.
    `tmp` (in the same directory) holds the new content until the rename commits it. A failure
    leaves `path` as it was (and removes `tmp`); a user-fixable one raises RunDirError."""
    with writing(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
