"""What the generation controls cost when unused: the time a real engine run spends in their code.

    python benchmarks/controls_cost.py [--rows 64] [--max-new-tokens 48]

A before/after wall-clock comparison of whole runs (benchmarks/engine.py in two checkouts) is
dominated by noise on a shared machine (runs of the same code vary by 30% or more), so this measures
the added code directly, inside one run: the engine's per-step and per-row hooks of the controls
(`runner._row_filters`, `Row._stopped`, `Row.final`) are wrapped with timers, and the repetition
score is computed for every finished row, as the pipeline does. Reported: decode seconds and the
share of them spent in that code, per mode and batch size, with no control in use. (The timers'
own overhead is counted in; the true cost is lower.)
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from twotower_cli.config import DecodeParams
from twotower_cli.engine import Engine, Request
from twotower_cli.engine import row as row_mod
from twotower_cli.engine import runner as runner_mod
from twotower_cli.model.checkpoint import ASSET_CHECKPOINT, load_model
from twotower_cli.model.tokenizer import load_tokenizer
from twotower_cli.quality import repetition
from twotower_cli.training.tasks import eval_set

spent: dict[str, float] = {}


def timed(owner: object, name: str) -> None:
    f = getattr(owner, name)

    @functools.wraps(f)
    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

    setattr(owner, name, g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    timed(runner_mod, "_row_filters")
    timed(row_mod.Row, "_stopped")
    timed(row_mod.Row, "final")
    model = load_model(str(ASSET_CHECKPOINT)).eval()
    tok = load_tokenizer(str(ASSET_CHECKPOINT))
    prompts = [tok.encode(p) for _, p, _ in eval_set(n_per_task=(a.rows + 4) // 5)[: a.rows]]
    for mode in ("diffusion", "speculative", "ar"):
        for batch in (1, 8):
            spent.clear()
            p = DecodeParams(mode=mode, max_new_tokens=a.max_new_tokens)
            t0 = time.perf_counter()
            reqs = [Request(str(i), ids, p) for i, ids in enumerate(prompts)]
            res = list(Engine(model, max_batch_rows=batch).run(reqs))
            decode = time.perf_counter() - t0
            t0 = time.perf_counter()
            for r in res:
                repetition(r.tokens)
            spent["repetition"] = time.perf_counter() - t0
            total = sum(spent.values())
            parts = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in spent.items())
            print(f"{mode:12} batch {batch}: decode {decode:.3f} s; controls' code {total * 1e3:.2f} ms "
                  f"= {total / decode:.2%} ({parts})")


if __name__ == "__main__":
    main()
