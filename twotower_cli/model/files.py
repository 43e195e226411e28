"""Which files a checkpoint directory holds, and its fingerprint: plain Python, no torch.

A run decides whether there is anything to do (and refuses a changed checkpoint) before torch
loads, so the facts it needs about a checkpoint live here; `model.checkpoint` loads the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from . import content_hash

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"
)
ASSET_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "tiny"


class CheckpointError(UserError):
    """A checkpoint directory that cannot be loaded; the message is one line, meant for users."""


def default_checkpoint() -> Path | None:
    """The embedded tiny checkpoint shipped in the wheel, if this build has one."""
    return ASSET_CHECKPOINT if (ASSET_CHECKPOINT / "config.json").is_file() else None


def checkpoint_dir(path: str | os.PathLike) -> Path:
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path is not a directory: {root}")
    if not (root / "config.json").is_file():
        raise CheckpointError(f"no config.json in {root}")
    return root


def weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint and, when sharded, the index's key -> file map."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"unreadable index {index}: {e}") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            # Shard names are plain file names inside the checkpoint directory, never paths.
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"index {index} references an invalid shard name {name!r}")
            if not (root / name).is_file():
                raise CheckpointError(f"index {index} references missing shard {name}")
        return [root / n for n in names], weight_map
    single = root / SINGLE_FILE
    if single.is_file():
        return [single], None
    hint = ""
    if any((root / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        hint = " (pickle checkpoints such as pytorch_model.bin are never loaded; convert to safetensors)"
    raise CheckpointError(f"no weights in {root}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")


def fingerprint(path: str | os.PathLike, *, on_hash: Callable[[Path, int], None] | None = None) -> str:
    """A short stable hash of a checkpoint's contents, not of where it is: moving or copying a
    checkpoint keeps it, a retrain of the same shapes changes it.

    Covers config.json, the shard index, the tokenizer files and every safetensors file's name and
    content (a digest of all its bytes, cached per user by `content_hash`: a checkpoint is read in
    full once, at about 1 GB/s, then only stat'ed). A weight file with a broken header is refused here.
    `on_hash(file, size)` is called before a weight file is read in full (not on a cache hit).
    """
    root = checkpoint_dir(path)
    files, _ = weight_files(root)
    h = hashlib.sha256(b"twotower-checkpoint-fingerprint-2\0")
    for name in ("config.json", INDEX_FILE, *TOKENIZER_FILES):
        f = root / name
        if f.is_file():
            h.update(f"{name}\0".encode())
            h.update(_read(f))
    for f in files:
        size = _check_header(f)
        h.update(f"{f.name}\0{size}\0".encode())
        try:
            h.update(content_hash.file_digest(f, on_miss=on_hash).encode())
        except OSError as e:
            raise CheckpointError(f"cannot read {f}: {e.strerror or e}") from None
    return h.hexdigest()[:16]


def _read(f: Path) -> bytes:
    try:
        return f.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {f}: {e.strerror or e}") from None


def _check_header(f: Path) -> int:
    """The file's size, once its safetensors header length is checked to be sane."""
    try:
        with content_hash.open_regular(f) as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
    except OSError as e:
        raise CheckpointError(f"cannot read {f}: {e.strerror or e}") from None
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= min(size - 8, 100 << 20):
        raise CheckpointError(f"corrupt safetensors file {f}: bad header length")
    return size
