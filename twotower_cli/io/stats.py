"""`twotower stats`: summarise an output directory from its committed shards, read-only.

Takes no lock and reads only the committed shards, `part-*.parquet` or `part-*.jsonl` (`jsonl` and
`openai` lines, io.formats), plus .manifest.json and .errors.jsonl when present, so it can watch a
run in progress: it sees exactly the committed rows. Of a Parquet shard it reads only the columns it
summarises; a JSON-lines shard is parsed line by line (orjson) into the same columns, so both give
the same summary of the same rows. Tokens per step is the one
definition of the summary and `bench` (engine.request.Stats, SPEC.md §3): Σ completion tokens /
Σ steps, a row's steps being its denoiser forwards (diffusion, mock-AR, speculative) or, for AR,
its completion tokens (one context forward chose each); the histogram bins each row's own
`tokens_per_step` column. The `repetition` column (a share in [0, 1], null when not scored) is
binned in REPETITION_EDGES, with its mean and the share of scored rows >= 0.5. A partitioned run (a job
array, see io.partition) is summarised as one: the union of every task's shards, manifests and
rejects. Columns are streamed in
record batches and aggregated with pyarrow.compute, so memory stays flat for any run size.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import MODES
from .formats import LINE_FORMATS, columns_from_line, sniff_format
from .rundir import ANY_SHARD_RE, ERRORS_RE, MANIFEST_RE, RunDirError
from .schema import COLUMNS
from .writer import count_errors

# Tokens-per-step bins: AR and mock-AR sit at exactly 1; diffusion spreads up to the block size.
TPS_EDGES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
# Repetition bins: [0, .1), [.1, .2), [.2, .3), [.3, .5), [.5, .7), [.7, .9), [.9, 1] (the last one
# closed; a value outside [0, 1], which no scorer of ours writes, counts in the nearest end bin).
REPETITION_EDGES = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
REPETITION_HIGH = 0.5  # `share_ge_0_5`: the share of scored rows at least this repetitive
_COLUMNS = ["mode", "finish_reason", "tokens_per_step", "latency_s", "created_at",
            "prompt_tokens", "completion_tokens", "denoiser_steps", "context_forwards", "repetition"]
_SUMS = ("prompt_tokens", "completion_tokens", "denoiser_steps", "context_forwards")
_TYPES = {name: t for name, t, _ in COLUMNS}
_BATCH = 8192


def tps_bin_labels() -> list[str]:
    e = TPS_EDGES
    return [f"<{e[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(e, e[1:], strict=False)] + [f">={e[-1]:g}"]


def repetition_bin_labels() -> list[str]:
    """`0-0.1`, ..., `0.9-1`: each bin [a, b), the last one [0.9, 1]."""
    e = REPETITION_EDGES
    return [f"{a:g}-{b:g}" for a, b in zip(e, e[1:], strict=False)]


def read_run(out_dir: str | Path) -> dict[str, Any]:
    """Summary of a run directory as a JSON-able dict (see render_summary for the fields)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory")
    entries = sorted(os.listdir(out))
    manifest, partition = _read_manifests(out, [e for e in entries if MANIFEST_RE.match(e)])
    fmt = (manifest or {}).get("shard_format")
    ext = "jsonl" if fmt in LINE_FORMATS else "parquet" if fmt == "parquet" else None
    # a run's own shards: those of its format (another format's files are not the run's)
    shards = [e for e in entries if (m := ANY_SHARD_RE.match(e)) and ext in (None, m.group("ext"))]
    if manifest is None and not shards:
        raise RunDirError(f"{out} holds no twotower run (no .manifest.json and no part-*.parquet/jsonl shards)")
    line_fmt = fmt if fmt in LINE_FORMATS else None  # None: each JSON-lines shard's first line says
    if fmt is None and shards:
        fmt = "parquet" if all(e.endswith(".parquet") for e in shards) else _sniff(out, shards)
    modes: Counter[str] = Counter()
    finish: Counter[str] = Counter()
    sums = dict.fromkeys(_SUMS, 0)
    tok_by_mode: Counter[str] = Counter()
    steps_by_mode: Counter[str] = Counter()
    hist = [0] * (len(TPS_EDGES) + 1)
    rep = _Repetition()
    lat_sum, lat_n, lat_max = 0.0, 0, None
    first_start = last_end = None
    rows = 0
    for name in shards:
        for t in _shard_tables(out / name, line_fmt):
            cols = t.column_names
            rows += t.num_rows
            modes.update(_counts(t, "mode"))
            finish.update(_counts(t, "finish_reason"))
            for c in _SUMS:
                if c in t.column_names:
                    sums[c] += pc.sum(t[c]).as_py() or 0
            _accumulate_steps(t, tok_by_mode, steps_by_mode)
            if "tokens_per_step" in t.column_names:
                _accumulate_hist(t, hist)
            if "repetition" in t.column_names:
                rep.add(t["repetition"])
            if "latency_s" in t.column_names:
                lat = t["latency_s"]
                lat_sum += pc.sum(lat).as_py() or 0.0
                lat_n += pc.count(lat).as_py()
                m = pc.max(lat).as_py()
                lat_max = m if lat_max is None or (m is not None and m > lat_max) else lat_max
            if "created_at" in t.column_names and t.num_rows:
                end_s = pc.divide(pc.cast(t["created_at"], pa.int64()), 1e6)
                start_s = pc.subtract(end_s, pc.fill_null(t["latency_s"], 0.0)) if "latency_s" in cols else end_s
                lo, hi = pc.min(start_s).as_py(), pc.max(end_s).as_py()
                first_start = lo if first_start is None else min(first_start, lo)
                last_end = hi if last_end is None else max(last_end, hi)
    wall = (last_end - first_start) if first_start is not None else None
    all_tok, all_steps = sum(tok_by_mode.values()), sum(steps_by_mode.values())
    return {
        "out_dir": str(out),
        "format": fmt,
        "schema_version": (manifest or {}).get("schema_version"),
        "fingerprint": (manifest or {}).get("fingerprint"),
        "complete": (manifest or {}).get("complete"),
        "shards": len(shards),
        "rows": rows,
        "partition": partition,
        # each task's file is deduplicated on write (io.writer.ErrorLog) and the tasks' rows are disjoint
        "rejected": sum(count_errors(out / e) for e in entries if ERRORS_RE.match(e)),
        "modes": _ordered(modes, MODES),
        "finish_reasons": dict(finish.most_common()),
        **sums,
        "tokens_per_step": {
            # Σ completion tokens / Σ steps, overall and per mode (see the module docstring)
            "mean": all_tok / all_steps if all_steps else None,
            "by_mode": {m: tok_by_mode[m] / steps_by_mode[m] for m in _ordered(steps_by_mode, MODES)
                        if steps_by_mode[m]},
            "histogram": dict(zip(tps_bin_labels(), hist, strict=True)),
        },
        "repetition": rep.summary(),
        "latency_s": {"mean": lat_sum / lat_n if lat_n else None, "max": lat_max},
        "throughput": {
            # From the first row's start to the last row's end: on a resumed run this includes
            # the time it was stopped, so it is a lower bound on the engine's real throughput.
            "wall_s": wall,
            "rows_per_s": rows / wall if wall else None,
            "completion_tokens_per_s": sums["completion_tokens"] / wall if wall else None,
        },
    }


def _sniff(out: Path, shards: list[str]) -> str | None:
    """The line format of a run without a manifest: that of its first JSON-lines shard's first line."""
    for name in shards:
        if name.endswith(".jsonl"):
            try:
                with open(out / name, "rb") as f:
                    line = f.readline()
                if line.strip():
                    return sniff_format(line)
            except (OSError, ValueError):
                return None
    return None


def _shard_tables(path: Path, fmt: str | None) -> Iterator[pa.Table]:
    """The summarised columns of one shard, in tables of up to _BATCH rows; `fmt` the line format of
    a JSON-lines shard (None: sniffed from its first line). A shard that does not read is one line
    (RunDirError) naming it."""
    try:
        if path.suffix == ".parquet":
            with pq.ParquetFile(path) as pf:
                cols = [c for c in _COLUMNS if c in pf.schema_arrow.names]
                for batch in pf.iter_batches(batch_size=_BATCH, columns=cols):
                    yield pa.Table.from_batches([batch])
            return
        schema = pa.schema([pa.field(c, _TYPES[c]) for c in _COLUMNS])
        line_fmt = fmt
        n = 0
        with open(path, "rb") as f:
            while True:
                lines = list(itertools.islice(f, _BATCH))
                if not lines:
                    return
                if line_fmt is None:  # no manifest to say: the shape of its lines does
                    line_fmt = sniff_format(lines[0])
                values: dict[str, list[Any]] = {c: [] for c in _COLUMNS}
                for line in lines:
                    n += 1
                    for c, v in columns_from_line(line, line_fmt, _COLUMNS).items():
                        values[c].append(v)
                yield pa.Table.from_pydict(values, schema=schema)
    except (OSError, ValueError, pa.ArrowException) as e:
        where = f" line {n}" if path.suffix != ".parquet" else ""
        raise RunDirError(f"cannot read {path.name}{where}: {' '.join(str(e).split())[:200]}") from None


class _Repetition:
    """The repetition column's histogram (REPETITION_EDGES), mean and share >= REPETITION_HIGH."""

    def __init__(self) -> None:
        self.hist = [0] * (len(REPETITION_EDGES) - 1)
        self.scored = self.unscored = self.high = 0
        self.total = 0.0

    def add(self, col: pa.ChunkedArray) -> None:
        self.unscored += col.null_count
        v = col.drop_null()
        if not len(v):
            return
        self.scored += len(v)
        self.total += pc.sum(v).as_py() or 0.0
        self.high += pc.sum(pc.cast(pc.greater_equal(v, REPETITION_HIGH), pa.int64())).as_py() or 0
        e = REPETITION_EDGES
        edges = (float("-inf"), *e[1:-1], float("inf"))  # the end bins take what lies outside [0, 1]
        for i in range(len(self.hist)):
            inside = pc.and_(pc.greater_equal(v, edges[i]), pc.less(v, edges[i + 1]))
            self.hist[i] += pc.sum(pc.cast(inside, pa.int64())).as_py() or 0

    def summary(self) -> dict[str, Any]:
        n = self.scored
        return {
            "scored": n,
            "unscored": self.unscored,
            "mean": self.total / n if n else None,
            "share_ge_0_5": self.high / n if n else None,
            "histogram": dict(zip(repetition_bin_labels(), self.hist, strict=True)),
        }


def _read_manifests(out: Path, names: list[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The run's manifest and, for a partitioned run, how many of its tasks have started and
    finished: the tasks' manifests agree on the fingerprint; `complete` means all N complete."""
    ms = [m for n in names if (m := _read_manifest(out / n)) is not None]
    parts = [m for m in ms if isinstance(m.get("partition"), dict)]
    if not parts:
        return (ms[0] if ms else None), None
    n = max(_int(m["partition"].get("count")) for m in parts)
    done = sum(bool(m.get("complete")) for m in parts)
    first = parts[0]
    merged = {**first, "complete": len(parts) == n and done == n}
    return merged, {"num_shards": n, "tasks_started": len(parts), "tasks_complete": done}


def _int(v: Any) -> int:
    """A count from a manifest that may have been edited by hand: 0 unless it is a plain integer."""
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _read_manifest(p: Path) -> dict[str, Any] | None:
    try:
        m = orjson.loads(p.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return m if isinstance(m, dict) else None


def _counts(t: pa.Table, col: str) -> dict[str, int]:
    if col not in t.column_names:
        return {}
    vc = pc.value_counts(t[col])
    return {("null" if v is None else v): n for v, n in zip(vc.field("values").to_pylist(),
                                                             vc.field("counts").to_pylist(), strict=True)}


def _accumulate_steps(t: pa.Table, tokens: Counter, steps: Counter) -> None:
    """Σ completion tokens and Σ steps per mode: a row's steps are its completion tokens for AR
    (one context forward chose each) and its denoiser steps otherwise."""
    names = t.column_names
    if "completion_tokens" not in names or "denoiser_steps" not in names:
        return
    mode = pc.fill_null(t["mode"], "null") if "mode" in names else pa.chunked_array(
        [pa.array(["null"] * t.num_rows, pa.string())])
    tok = pc.fill_null(t["completion_tokens"], 0)
    st = pc.if_else(pc.equal(mode, "ar"), tok, pc.fill_null(t["denoiser_steps"], 0))
    g = pa.table({"mode": mode, "tok": tok, "st": st}).group_by("mode").aggregate([("tok", "sum"), ("st", "sum")])
    for m, a, b in zip(g["mode"].to_pylist(), g["tok_sum"].to_pylist(), g["st_sum"].to_pylist(), strict=True):
        tokens[m] += a or 0
        steps[m] += b or 0


def _accumulate_hist(t: pa.Table, hist: list[int]) -> None:
    tps = t["tokens_per_step"]
    edges = (float("-inf"), *TPS_EDGES, float("inf"))
    for i in range(len(hist)):
        inside = pc.and_(pc.greater_equal(tps, edges[i]), pc.less(tps, edges[i + 1]))
        hist[i] += pc.sum(pc.cast(inside, pa.int64())).as_py() or 0


def _ordered(c: Counter, first: tuple[str, ...]) -> dict[str, int]:
    keys = [k for k in first if k in c] + sorted(k for k in c if k not in first)
    return {k: c[k] for k in keys}


def render_summary(s: dict[str, Any]) -> str:
    """Plain text for a terminal (the CLI may add colour); stable enough to grep."""

    def num(v: Any, fmt: str = ",.2f") -> str:
        return "-" if v is None else format(v, fmt)

    state = {True: "complete", False: "incomplete"}.get(s["complete"], "unknown")
    lines = [
        f"{s['out_dir']}  ({state}, {s.get('format') or '?'}, schema v{s['schema_version'] or '?'})",
        f"  rows        {s['rows']:,} in {s['shards']} shard(s); rejected {s['rejected']:,}",
        *([f"  tasks       {p['tasks_complete']} of {p['num_shards']} complete, {p['tasks_started']} started"]
          if (p := s.get("partition")) else []),
        "  modes       " + (", ".join(f"{m} {n:,}" for m, n in s["modes"].items()) or "-"),
        "  finish      " + (", ".join(f"{m} {n:,}" for m, n in s["finish_reasons"].items()) or "-"),
        f"  tokens      prompt {s['prompt_tokens']:,}, completion {s['completion_tokens']:,}",
        f"  steps       denoiser {s['denoiser_steps']:,}, context forwards {s['context_forwards']:,}",
        f"  tok/step    {num(s['tokens_per_step']['mean'])} (Σ completion tokens / Σ steps)"
        + "".join(f", {m} {num(v)}" for m, v in s["tokens_per_step"]["by_mode"].items()),
    ]
    hist = s["tokens_per_step"]["histogram"]
    top = max(hist.values(), default=0)
    for label, n in hist.items():
        if n:
            lines.append(f"    {label:>7}  {n:>9,}  {'#' * max(1, round(30 * n / top))}")
    r = s["repetition"]
    if r["scored"]:
        lines.append(f"  repetition  mean {num(r['mean'], '.3f')}, >= {REPETITION_HIGH:g} in {r['share_ge_0_5']:.1%} "
                     f"of {r['scored']:,} scored row(s)" + (f" ({r['unscored']:,} unscored)" if r["unscored"] else ""))
        top = max(r["histogram"].values())
        for label, n in r["histogram"].items():
            if n:
                lines.append(f"    {label:>7}  {n:>9,}  {'#' * max(1, round(30 * n / top))}")
    elif r["unscored"]:
        lines.append(f"  repetition  - ({r['unscored']:,} unscored row(s))")
    lat, th = s["latency_s"], s["throughput"]
    lines.append(f"  latency     mean {num(lat['mean'])} s, max {num(lat['max'])} s")
    lines.append(
        f"  throughput  {num(th['rows_per_s'])} rows/s, {num(th['completion_tokens_per_s'])} tok/s "
        f"over {num(th['wall_s'], ',.1f')} s wall"
    )
    return "\n".join(lines)
