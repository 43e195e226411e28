"""`twotower bench`: quality and speed of AR, speculative, mock-AR and mask diffusion on held-out tasks.

Every configuration decodes the same held-out prompts (tasks with exact answers, never seen in
training) with the same engine in the same process, at each batch size asked for; quality is exact
match, speed is generated tokens per wall-clock second, and the speed-up is against the AR row of
the same batch size. `match_ar` is the share of rows whose tokens equal AR's at that batch size
(speculative decoding is exact, so 1.0 there). Timing runs in `rounds` passes, each pass every
(batch, configuration) once in turn, and takes each one's median: on a shared machine a burst of
load then hits one pass of every configuration rather than all passes of one (decoding is
deterministic, so every pass gives the same outputs). The table has the shape of the release's:
quality retained vs AR, tokens per step (`engine.request.Stats`, aggregated as Σ completion tokens
/ Σ steps), throughput and speed-up per γ, grouped by batch size.
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
SPEC_GAMMAS = (0.5, 0.8, 0.95)
BATCHES = (1,)

Config = tuple[str, float | None]


def parse_gammas(text: str, flag: str = "--gammas") -> tuple[float, ...]:
    """`--gammas 0.5,0.9` -> (0.5, 0.9); each value is checked by DecodeParams, like --gamma of `gen`."""
    try:
        gammas = tuple(float(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not gammas:
        raise UserError(f"{flag} must name at least one γ")
    for g in gammas:
        try:
            DecodeParams(gamma=g)
        except ConfigError as e:
            raise UserError(f"{flag}: {e}") from None
    return gammas


def parse_batches(text: str) -> tuple[int, ...]:
    """`--batch 1,8,32` -> (1, 8, 32): positive integers, in the order given, each once."""
    batches: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            b = int(part)
        except ValueError:
            raise UserError(f"--batch must be comma-separated positive integers, got {text!r}") from None
        if b < 1:
            raise UserError(f"--batch sizes must be at least 1, got {b}")
        if b not in batches:
            batches.append(b)
    if not batches:
        raise UserError("--batch must name at least one batch size")
    return tuple(batches)


def _configs(gammas: tuple[float, ...], spec_gammas: tuple[float, ...] = ()) -> list[Config]:
    return ([("ar", None)] + [("speculative", g) for g in spec_gammas] + [("mock-ar", None)]
            + [("diffusion", g) for g in gammas])


def evaluate(model, tok, items, mode: str, gamma: float | None, batch: int, decode: DecodeParams) -> dict[str, Any]:
    """Decode every held-out prompt once; exact match per task, tokens per step, tokens/s, and
    each row's tokens (`outputs`, by prompt index; for `match_ar`, not printed)."""
    from ..engine import Engine, Request

    params = decode.replace(mode=mode, gamma=gamma if gamma is not None else 0.8)
    reqs = [Request(str(i), tok.encode(prompt), params) for i, (_, prompt, _) in enumerate(items)]
    eos = set(model.config.eos_ids)
    engine = Engine(model, max_batch_rows=batch)
    t0 = time.perf_counter()
    results = list(engine.run(reqs))
    wall = time.perf_counter() - t0
    right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    tokens = steps_total = rounds = 0
    round_tokens = 0.0  # speculative: Σ accepted_per_round x verify forwards, i.e. tokens the verifies committed
    outputs: dict[int, list[int]] = {}
    for r in results:
        task, _, answer = items[int(r.id)]
        outputs[int(r.id)] = list(r.tokens)
        toks = r.tokens[:-1] if r.tokens and r.tokens[-1] in eos else r.tokens
        right[task][0] += tok.decode(toks, skip_special_tokens=True) == answer
        right[task][1] += 1
        tokens += r.stats.completion_tokens
        steps_total += r.stats.steps
        if r.stats.accepted_per_round is not None:  # verify forwards: every context forward but the prefill
            n = r.stats.context_forwards - 1
            rounds += n
            round_tokens += r.stats.accepted_per_round * n
    per_task = {t: c / n for t, (c, n) in right.items()}
    return {"mode": mode, "gamma": gamma, "batch": batch,
            "accuracy": sum(c for c, _ in right.values()) / len(results),
            "per_task": per_task, "tokens_per_step": tokens / steps_total if steps_total else 0.0,
            "accepted_per_round": round_tokens / rounds if rounds else None,
            "tokens_per_s": tokens / wall, "completion_tokens": tokens, "wall_s": wall, "outputs": outputs}


def run(model_path: Path | None, decode: DecodeParams, gammas: tuple[float, ...] = GAMMAS,
        spec_gammas: tuple[float, ...] = SPEC_GAMMAS, *, as_json: bool = False, n_per_task: int = 20,
        batches: tuple[int, ...] = BATCHES, threads: int | None = None, seed: int = 0, rounds: int = 3) -> None:
    """Decode the held-out prompts with every configuration at every batch size (`decode` gives S,
    T and the token limit; mode and γ vary) and print the table, or one JSON object per
    (batch, configuration)."""
    import torch

    from ..model.checkpoint import default_checkpoint, load_model
    from ..model.tokenizer import load_tokenizer
    from ..training.tasks import eval_set  # the held-out split of the embedded model's tasks

    path = model_path or default_checkpoint()
    if path is None:
        raise UserError("no --model given and this build has no embedded model")
    from .gen import default_threads

    torch.set_num_threads(threads or default_threads())  # the same default as gen (options.DEFAULT_THREADS)
    model = load_model(path).eval()
    tok = load_tokenizer(path)
    items = eval_set(n_per_task=n_per_task, seed=seed)
    runs_of = [(b, mode, gamma) for b in batches for mode, gamma in _configs(gammas, spec_gammas)]
    for b, mode, gamma in runs_of:
        evaluate(model, tok, items[:2], mode, gamma, b, decode)  # warm-up
    passes: list[list[dict[str, Any]]] = [[] for _ in runs_of]
    for k in range(rounds):
        for i, (b, mode, gamma) in enumerate(runs_of):
            passes[i].append(evaluate(model, tok, items, mode, gamma, b, decode))
        if not as_json:
            print(f"  pass {k + 1}/{rounds} done", file=sys.stderr, flush=True)
    rows = []
    for (b, _, _), runs in zip(runs_of, passes):
        walls = sorted(r["wall_s"] for r in runs)
        row = dict(runs[0], batch=b, wall_s=walls[len(walls) // 2])  # the median pass (upper one if even)
        row["tokens_per_s"] = row["completion_tokens"] / row["wall_s"]
        rows.append(row)
    ar_of = {r["batch"]: r for r in rows if r["mode"] == "ar"}
    for r in rows:
        ar = ar_of[r["batch"]]
        r["quality_vs_ar"] = r["accuracy"] / ar["accuracy"] if ar["accuracy"] else 0.0
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"] if ar["tokens_per_s"] else 0.0
        same = sum(r["outputs"].get(i) == toks for i, toks in ar["outputs"].items())
        r["match_ar"] = same / len(ar["outputs"]) if ar["outputs"] else 0.0
    for r in rows:
        del r["outputs"]
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    tasks = list(rows[0]["per_task"])
    head = f"{'mode':<12}{'γ':>5} " + "".join(f"{t:>8}" for t in tasks)
    head += f"{'all':>8}{'vs AR':>8}{'=AR':>8}{'tok/step':>9}{'acc/rnd':>8}{'tok/s':>9}{'speedup':>9}"
    print(f"{path} | {len(items)} held-out prompts | S={decode.block_size} T={decode.steps_per_block} | "
          f"batch {','.join(map(str, batches))} | "
          f"{torch.get_num_threads()} thread(s)")
    for b in batches:
        print(f"batch {b}")
        print(head)
        for r in (r for r in rows if r["batch"] == b):
            g = "-" if r["gamma"] is None else f"{r['gamma']:.2f}"
            apr = "-" if r["accepted_per_round"] is None else f"{r['accepted_per_round']:.2f}"
            line = f"{r['mode']:<12}{g:>5} " + "".join(f"{100 * r['per_task'][t]:>7.1f}%" for t in tasks)
            line += (f"{100 * r['accuracy']:>7.1f}%{100 * r['quality_vs_ar']:>7.1f}%{100 * r['match_ar']:>7.1f}%"
                     f"{r['tokens_per_step']:>9.2f}{apr:>8}{r['tokens_per_s']:>9.1f}{r['speedup_vs_ar']:>8.2f}x")
            print(line)
