"""The checkpoint facts a run needs before torch loads: which directory, and its fingerprint.

Torch-free on purpose: a rerun of `twotower gen` with nothing left to do checks the output
directory against the checkpoint's fingerprint and exits without importing torch (<= 1 s). The
fingerprint here must equal `model.checkpoint.fingerprint` byte for byte (a test pins it); it reads
config.json, the shard index, the tokenizer files and each safetensors file's name, size and header.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
ASSET_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "tiny"


class CheckpointPathError(UserError):
    """A checkpoint directory that cannot be used (one line, exit 2)."""


def default_checkpoint() -> Path | None:
    """The embedded tiny checkpoint shipped in the wheel, if this build has one."""
    return ASSET_CHECKPOINT if (ASSET_CHECKPOINT / "config.json").is_file() else None


def checkpoint_dir(path: str | os.PathLike) -> Path:
    root = Path(path)
    if not root.exists():
        raise CheckpointPathError(f"checkpoint directory not found: {root}")
    if not root.is_dir():
        raise CheckpointPathError(f"checkpoint path is not a directory: {root}")
    if not (root / "config.json").is_file():
        raise CheckpointPathError(f"no config.json in {root}")
    return root


def _weight_files(root: Path) -> list[Path]:
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointPathError(f"unreadable index {index}: {e}") from None
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise CheckpointPathError(f"index {index} references an invalid shard name {name!r}")
            if not (root / name).is_file():
                raise CheckpointPathError(f"index {index} references missing shard {name}")
        return [root / n for n in names]
    single = root / SINGLE_FILE
    if single.is_file():
        return [single]
    hint = ""
    if any((root / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        hint = " (pickle checkpoints such as pytorch_model.bin are never loaded; convert to safetensors)"
    raise CheckpointPathError(f"no weights in {root}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")


def fingerprint(path: str | os.PathLike) -> str:
    """`model.checkpoint.fingerprint` without torch: a short hash of the checkpoint's files (not
    the tensor bytes)."""
    root = checkpoint_dir(path)
    files = _weight_files(root)
    h = hashlib.sha256()
    for name in ("config.json", INDEX_FILE, *TOKENIZER_FILES):
        f = root / name
        if f.is_file():
            h.update(f"{name}\0".encode())
            h.update(f.read_bytes())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 100 << 20):
                raise CheckpointPathError(f"corrupt safetensors file {f}: bad header length")
            h.update(fh.read(n))
    return h.hexdigest()[:16]
