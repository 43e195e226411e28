"""The checkpoint's tokenizer, from local files only (no download, no remote code)."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike):
    """`AutoTokenizer` from a checkpoint directory. Raises `CheckpointError` (one line) when the
    directory has no tokenizer or transformers cannot read it."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"tokenizer directory not found: {root}")
    if not any((root / m).is_file() for m in TOKENIZER_MARKERS):
        raise CheckpointError(f"no tokenizer in {root}: expected one of {', '.join(TOKENIZER_MARKERS)}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # OSError, ValueError (e.g. a tokenizer that needs remote code), ...
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"cannot load the tokenizer in {root}: {msg}") from None
