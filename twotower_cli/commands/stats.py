"""`twotower stats DIR`: rows, modes, finish reasons, tokens-per-step histogram, repetition
histogram, throughput; of a run of any format (Parquet shards, or `jsonl`/`openai` lines).

Torch-free (pyarrow and orjson only): a directory that holds no run, or a shard that does not
read, is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def run(out_dir: Path, as_json: bool) -> None:
    from ..io.stats import read_run, render_summary

    try:
        summary = read_run(out_dir)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UserError(str(e)) from None
    print(json.dumps(summary, indent=2, default=str) if as_json else render_summary(summary))
