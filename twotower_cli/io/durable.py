"""Durable files on POSIX: fsync by path, fsync of a directory entry, and atomic replacement.

The building blocks of every commit in an output directory (io.writer's shards, io.rundir's
manifest). They know nothing of the directory's names: the caller says where a temporary file goes.
"""

from __future__ import annotations

import os
from pathlib import Path


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
    `tmp` (in the same directory) holds the new content until the rename commits it."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
