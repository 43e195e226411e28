"""`twotower bench`: quality and speed of AR, mock-AR and mask diffusion on held-out tasks.

Every configuration decodes the same held-out prompts (tasks with exact answers, never seen in
training) with the same engine in the same process; quality is exact match, speed is generated
tokens per wall-clock second, and the speed-up is against the AR row of the same run. Timing runs
in `rounds` passes, each pass every configuration once in turn, and takes each configuration's
median: on a shared machine a burst of load then hits one pass of every configuration rather
than all passes of one (decoding is deterministic, so every pass gives the same outputs). The
table has the shape of the release's: quality retained vs AR, tokens per denoiser step,
throughput and speed-up per γ.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..config import ConfigError, DecodeParams
from ..errors import UserError

GAMMAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def parse_gammas(text: str) -> tuple[float, ...]:
    """`--gammas 0.5,0.9` -> (0.5, 0.9); each value is checked by DecodeParams, like --gamma of `gen`."""
    try:
        gammas = tuple(float(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise UserError(f"--gammas must be comma-separated numbers, got {text!r}") from None
    if not gammas:
        raise UserError("--gammas must name at least one γ")
    for g in gammas:
        try:
            DecodeParams(gamma=g)
        except ConfigError as e:
            raise UserError(f"--gammas: {e}") from None
    return gammas


def _configs(gammas: tuple[float, ...]) -> list[tuple[str, float | None]]:
    return [("ar", None), ("mock-ar", None)] + [("diffusion", g) for g in gammas]


def evaluate(model, tok, items, mode: str, gamma: float | None, batch: int, decode: DecodeParams) -> dict[str, Any]:
    """Decode every held-out prompt once; exact match per task, tokens per step, tokens/s."""
    from ..engine import Engine, Request

    params = decode.replace(mode=mode, gamma=gamma if gamma is not None else 0.8)
    reqs = [Request(str(i), tok.encode(prompt), params) for i, (_, prompt, _) in enumerate(items)]
    eos = set(model.config.eos_ids)
    engine = Engine(model, max_batch_rows=batch)
    t0 = time.perf_counter()
    results = list(engine.run(reqs))
    wall = time.perf_counter() - t0
    right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    tokens = steps_total = 0
    for r in results:
        task, _, answer = items[int(r.id)]
        toks = r.tokens[:-1] if r.tokens and r.tokens[-1] in eos else r.tokens
        right[task][0] += tok.decode(toks, skip_special_tokens=True) == answer
        right[task][1] += 1
        tokens += r.stats.completion_tokens
        steps_total += r.stats.steps
    per_task = {t: c / n for t, (c, n) in right.items()}
    return {"mode": mode, "gamma": gamma, "accuracy": sum(c for c, _ in right.values()) / len(results),
            "per_task": per_task, "tokens_per_step": tokens / steps_total if steps_total else 0.0,
            "tokens_per_s": tokens / wall, "completion_tokens": tokens, "wall_s": wall}


def run(model_path: Path | None, decode: DecodeParams, gammas: tuple[float, ...] = GAMMAS, *, as_json: bool = False,
        n_per_task: int = 20, batch: int = 1, threads: int | None = None, seed: int = 0, rounds: int = 3) -> None:
    """Decode the held-out prompts with every configuration (`decode` gives S, T and the token
    limit; mode and γ vary) and print the table, or one JSON object per configuration."""
    import torch

    from ..model.checkpoint import default_checkpoint, load_model
    from ..model.tokenizer import load_tokenizer
    from ..training.tasks import eval_set  # the held-out split of the embedded model's tasks

    path = model_path or default_checkpoint()
    if path is None:
        raise UserError("no --model given and this build has no embedded model")
    if threads:
        torch.set_num_threads(threads)
    model = load_model(path).eval()
    tok = load_tokenizer(path)
    items = eval_set(n_per_task=n_per_task, seed=seed)
    configs = _configs(gammas)
    for mode, gamma in configs:
        evaluate(model, tok, items[:2], mode, gamma, batch, decode)  # warm-up
    passes: list[list[dict[str, Any]]] = [[] for _ in configs]
    for k in range(rounds):
        for i, (mode, gamma) in enumerate(configs):
            passes[i].append(evaluate(model, tok, items, mode, gamma, batch, decode))
        if not as_json:
            print(f"  pass {k + 1}/{rounds} done", file=sys.stderr, flush=True)
    rows = []
    for runs in passes:
        walls = sorted(r["wall_s"] for r in runs)
        row = dict(runs[0], wall_s=walls[len(walls) // 2])  # the median pass (upper one if even)
        row["tokens_per_s"] = row["completion_tokens"] / row["wall_s"]
        rows.append(row)
    ar = rows[0]
    for r in rows:
        r["quality_vs_ar"] = r["accuracy"] / ar["accuracy"] if ar["accuracy"] else 0.0
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"] if ar["tokens_per_s"] else 0.0
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    tasks = list(rows[0]["per_task"])
    head = f"{'mode':<10}{'γ':>5} " + "".join(f"{t:>8}" for t in tasks)
    head += f"{'all':>8}{'vs AR':>8}{'tok/step':>9}{'tok/s':>9}{'speedup':>9}"
    print(f"{path} | {len(items)} held-out prompts | S={decode.block_size} T={decode.steps_per_block} | "
          f"batch {batch} | "
          f"{torch.get_num_threads()} thread(s)")
    print(head)
    for r in rows:
        g = "-" if r["gamma"] is None else f"{r['gamma']:.2f}"
        line = f"{r['mode']:<10}{g:>5} " + "".join(f"{100 * r['per_task'][t]:>7.1f}%" for t in tasks)
        line += (f"{100 * r['accuracy']:>7.1f}%{100 * r['quality_vs_ar']:>7.1f}%{r['tokens_per_step']:>9.2f}"
                 f"{r['tokens_per_s']:>9.1f}{r['speedup_vs_ar']:>8.2f}x")
        print(line)
