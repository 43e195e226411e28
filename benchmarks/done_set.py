"""The resume bookkeeping at scale: io.rundir.DoneSet and a resume's peak RSS.

    python benchmarks/done_set.py                 # 10M-id done set + resume RSS at 2k and 200k rows
    python benchmarks/done_set.py --ids 1000000 --rows 2000,50000

1. Build a DoneSet of --ids synthetic ids (row groups of 1,000, as the writer makes them; the ids
   of a row group are regenerated on demand, standing in for reading them from its shard), then
   query 200k committed ids (hits, confirmed against the real ids) and 200k absent ones (misses).
   Reports build time, the index's bytes per id, the RSS growth, and query rates; and, for scale,
   what a Python set of the same ids takes.
2. For each --rows N: write a run directory of N committed rows and an input of the same N rows,
   then resume it in a fresh process (nothing left to do: every row is checked against the done
   set) and report that process's peak RSS (ru_maxrss). The goal: 200k within 1.05x of 2k.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_done_set(n: int, group: int = 1000) -> dict:
    import numpy as np

    from twotower_cli.io.rundir import DoneSet, id_hashes

    def ids_of(g: int) -> list[str]:
        return [f"row-{i:010d}" for i in range(g * group, min(n, (g + 1) * group))]

    before = rss_mb()
    t0 = time.perf_counter()
    d = DoneSet(load_group=ids_of)
    for g in range((n + group - 1) // group):
        d.add_group(g, id_hashes(ids_of(g)), np.zeros(min(group, n - g * group), dtype=np.uint64))
    d.freeze()
    build = time.perf_counter() - t0
    grown = rss_mb() - before
    q = 200_000
    rng = np.random.default_rng(0)
    start = int(rng.integers(0, max(1, n - q)))
    hits = [f"row-{i:010d}" for i in range(start, start + min(q, n))]  # input order, as a resume reads
    misses = [f"new-{i:010d}" for i in range(q)]
    t0 = time.perf_counter()
    assert all(h in d for h in hits)
    t_hit = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert not any(m in d for m in misses)
    t_miss = time.perf_counter() - t0
    out = {"ids": n, "build_s": round(build, 2), "index_bytes_per_id": d.nbytes() / n,
           "index_mb": round(d.nbytes() / 2**20, 1), "rss_growth_mb": round(grown, 1),
           "hit_us": round(t_hit / len(hits) * 1e6, 2), "miss_us": round(t_miss / len(misses) * 1e6, 2)}
    del d
    sample = min(n, 1_000_000)  # a Python set of str ids, measured on up to 1M and scaled
    before = rss_mb()
    s = {f"row-{i:010d}" for i in range(sample)}
    out["python_set_bytes_per_id"] = round((rss_mb() - before) * 2**20 / sample, 1)
    del s
    return out


CHILD = """
import json, sys
from pathlib import Path
from twotower_cli.pipeline import Decoder, RunConfig, generate
class Nothing(Decoder):
    counters = dict.fromkeys(("prefill_calls", "prefill_tokens", "prefill_padded_tokens", "denoiser_calls",
                              "context_calls"), 0)
    def decode(self, rows, signals, is_done):
        raise AssertionError("nothing should be left to do")
src, out = sys.argv[1], Path(sys.argv[2])
cfg = RunConfig(source=src, out_dir=out, model=None, tokenizer=None, model_name="m", model_fingerprint="f")
s = generate(cfg, Nothing)
assert s["nothing_to_do"] and s["rows_skipped_done"] == int(sys.argv[3]), s
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": round(hwm / 1024, 1)}))
"""


def make_run(tmp: Path, n: int) -> tuple[Path, Path]:
    import orjson

    from twotower_cli.io.rundir import RunDir
    from twotower_cli.io.schema import PromptRow
    from twotower_cli.pipeline import RunConfig, fingerprint, input_hash

    src, out = tmp / f"in-{n}.jsonl", tmp / f"out-{n}"
    cfg = RunConfig(source=str(src), out_dir=out, model=None, tokenizer=None, model_name="m", model_fingerprint="f")
    with open(src, "wb") as f, RunDir(out, fingerprint(cfg), rows_per_shard=10_000) as rd:
        for i in range(n):
            rid, prompt = f"row-{i:09d}", f"prompt number {i} " * 4
            f.write(orjson.dumps({"id": rid, "prompt": prompt}) + b"\n")
            h = input_hash(PromptRow(rid, i + 1, prompt, None), cfg.defaults)
            rd.add({"id": rid, "prompt": prompt, "completion": "a completion of some length " * 8,
                    "completion_tokens": 40, "input_hash": h})
    return src, out


def bench_resume(sizes: list[int]) -> list[dict]:
    res = []
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            t0 = time.perf_counter()
            src, out = make_run(Path(d), n)
            made = time.perf_counter() - t0
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(n)], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
            res.append({"rows": n, **json.loads(p.stdout.strip().splitlines()[-1]),
                        "resume_s": round(time.perf_counter() - t0, 2), "make_s": round(made, 1)})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ids", type=int, default=10_000_000)
    ap.add_argument("--rows", default="2000,200000")
    a = ap.parse_args()
    print(json.dumps({"done_set": bench_done_set(a.ids)}), flush=True)
    r = bench_resume([int(x) for x in a.rows.split(",")])
    ratio = r[-1]["peak_rss_mb"] / r[0]["peak_rss_mb"]
    print(json.dumps({"resume": r, "peak_rss_ratio": round(ratio, 3)}))
    print(f"peak RSS {r[-1]['rows']:,} rows / {r[0]['rows']:,} rows = {ratio:.3f}x (goal <= 1.05x); "
          f"max RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
