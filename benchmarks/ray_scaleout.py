"""`twotower gen --ray` scale-out: rows/s with 1 vs 2 actors, and the Ray path's overhead vs a local run.

    python benchmarks/ray_scaleout.py [--model DIR] [--rows 1024] [--max-new-tokens 16] [--batch-rows 128]

Runs the same `twotower gen` command (in process) three ways on the same prompts: local (one
torch thread), Ray with 1 actor and Ray with 2 actors (one CPU and one torch thread each), into
fresh output directories, on one local Ray instance started once (`ray.init(num_cpus=2)`).
Reports per run:
- wall_s: the whole command (for Ray: reading, actor start-up and model loads included);
- gen_rows_per_s: rows / (first row's start .. last row's end), from the rows' own timestamps as
  `twotower stats` computes it: the steady-state rate without start-up;
and the Ray path's overhead per row = wall_s(ray, 1 actor) / rows - wall_s(local) / rows, and in
steady state 1/gen_rows_per_s(ray, 1 actor) - 1/gen_rows_per_s(local). Checks that the three
output directories hold the same rows. Default model: a random tiny checkpoint (ModelConfig.tiny()).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import orjson  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from twotower_cli import ModelConfig, save_pretrained  # noqa: E402
from twotower_cli.cli import app  # noqa: E402
from twotower_cli.model.twotower import TwoTower  # noqa: E402
from twotower_cli.training.tokenizer_build import save_tokenizer, vocab  # noqa: E402


def tiny_checkpoint(d: Path) -> Path:
    m = TwoTower(ModelConfig.tiny(vocab_size=len(vocab())), seed=0)
    save_pretrained(m, d)
    save_tokenizer(d)
    return d


def prompts(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with open(path, "wb") as f:
        for i in range(n):
            text = "".join(rng.choice("0123456789+-*=ab ") for _ in range(rng.randint(4, 48)))
            f.write(orjson.dumps({"id": f"r{i}", "prompt": text}) + b"\n")
    return path


def gen(args: list[str]) -> tuple[dict, float]:
    t = time.perf_counter()
    r = CliRunner().invoke(app, ["gen", *args])
    wall = time.perf_counter() - t
    if r.exit_code != 0:
        sys.exit(f"twotower gen failed ({r.exit_code}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]), wall


def stats(out: Path) -> dict:
    r = CliRunner().invoke(app, ["stats", str(out), "--json"])
    return json.loads(r.stdout)


def rows(out: Path) -> dict:
    t = pads.dataset(sorted(map(str, out.glob("part-*.parquet"))), format="parquet").to_table(
        columns=["id", "completion"])
    return dict(zip(t["id"].to_pylist(), t["completion"].to_pylist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-rows", type=int, default=128, help="rows per actor call")
    ap.add_argument("--max-batch-rows", type=int, default=16, help="engine slots (local and per actor)")
    a = ap.parse_args()
    import ray

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    model = a.model or tiny_checkpoint(tmp / "tiny-random")
    src = prompts(tmp / "p.jsonl", a.rows)
    common = [str(src), "--model", str(model), "--block", "4", "--max-new-tokens", str(a.max_new_tokens),
              "--max-batch-rows", str(a.max_batch_rows), "-q"]
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray_init_s = time.perf_counter() - t
    runs = {}
    for name, extra in [("local", []),
                        ("ray_1_actor", ["--ray", "--ray-actors", "1", "--ray-batch-rows", str(a.batch_rows)]),
                        ("ray_2_actors", ["--ray", "--ray-actors", "2", "--ray-batch-rows", str(a.batch_rows)])]:
        out = tmp / name
        summary, wall = gen([*common, "-o", str(out), *extra])
        st = stats(out)
        runs[name] = {"wall_s": round(wall, 2), "rows": summary["rows_written"],
                      "rows_per_s": round(summary["rows_written"] / wall, 2),
                      "gen_rows_per_s": round(st["throughput"]["rows_per_s"], 2),
                      "tokens_per_s": round(st["throughput"]["completion_tokens_per_s"], 1),
                      "out": out}
    ray.shutdown()
    same = rows(runs["local"]["out"]) == rows(runs["ray_1_actor"]["out"]) == rows(runs["ray_2_actors"]["out"])
    loc, r1, r2 = runs["local"], runs["ray_1_actor"], runs["ray_2_actors"]
    for r in runs.values():
        r.pop("out")
    print(json.dumps({
        "rows": a.rows, "max_new_tokens": a.max_new_tokens, "batch_rows": a.batch_rows, "cpus": os.cpu_count(),
        "ray_init_s": round(ray_init_s, 2), "runs": runs, "same_rows": same,
        "speedup_2_vs_1_actor": {"wall": round(r1["wall_s"] / r2["wall_s"], 2),
                                 "gen": round(r2["gen_rows_per_s"] / r1["gen_rows_per_s"], 2)},
        "ray_overhead_per_row_ms": {"wall": round(1000 * (r1["wall_s"] - loc["wall_s"]) / a.rows, 2),
                                    "steady": round(1000 * (1 / r1["gen_rows_per_s"] - 1 / loc["gen_rows_per_s"]), 2)},
    }, indent=2))


if __name__ == "__main__":
    main()
