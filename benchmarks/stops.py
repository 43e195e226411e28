"""Stop strings end rows without wasted steps: denoiser steps and context forwards of a run whose
rows end at a stop string, against the same run ended by the token limit, side by side.

    python benchmarks/stops.py [--rows 64] [--max-new-tokens 64] [--modes diffusion,speculative,ar]

The released checkpoint is a base model that rarely emits EOS, so real rows end at a stop string or
at the token limit. The embedded tiny model does end its answers with EOS ("</s>"); to stand in for
a base model this benchmark ignores the EOS (the engine is given no EOS id, so rows run on past
their answers as a base model's do) and ends rows at the stop string "</s>", matched on text
decoded with special tokens kept. Three runs per mode on the same prompts (the embedded model's
held-out task prompts) and settings:

    limit   no EOS, no stop string: every row runs to --max-new-tokens (what a base model costs
            without stop strings)
    stop    no EOS, stop string "</s>": rows end right after the commit that completes it
    eos     the model's EOS (the lower bound: the row ends where the answer ends)

Reported: denoiser steps, context forwards, wall seconds, and a check that each `stop` row's tokens
are the `limit` row's tokens up to the stop (the stop changes where a row ends, never its tokens).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from twotower_cli.config import DecodeParams
from twotower_cli.engine import Engine, Request
from twotower_cli.engine.stops import StopMatcher
from twotower_cli.model.checkpoint import ASSET_CHECKPOINT, load_model
from twotower_cli.model.tokenizer import load_tokenizer
from twotower_cli.training.tasks import eval_set


def run(model, reqs, eos) -> tuple[dict, float, dict]:
    engine = Engine(model, max_batch_rows=16, eos_ids=eos)
    t0 = time.perf_counter()
    out = {r.id: r for r in engine.run(reqs)}
    return out, time.perf_counter() - t0, engine.counters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ASSET_CHECKPOINT))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--modes", default="diffusion,speculative,ar")
    ap.add_argument("--gamma", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    tok = load_tokenizer(args.model)
    eos = set(model.config.eos_ids)
    stop = tok.decode(sorted(eos)[:1], skip_special_tokens=False)

    def keep_special(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    tasks = eval_set(max(1, args.rows // 4))  # (task, prompt, answer), several tasks
    prompts = [tok.encode(p) for _, p, _ in tasks][: args.rows]
    results = []
    for mode in args.modes.split(","):
        p = DecodeParams(mode=mode, gamma=args.gamma, block_size=16, steps_per_block=16,
                         max_new_tokens=args.max_new_tokens)

        def reqs(with_stop: bool, p: DecodeParams = p) -> list[Request]:
            return [Request(str(i), ids, p, stop=StopMatcher([stop], keep_special) if with_stop else None)
                    for i, ids in enumerate(prompts)]

        row = {"mode": mode}
        outs = {}
        for name, rq, e in (("limit", reqs(False), set()), ("stop", reqs(True), set()), ("eos", reqs(False), eos)):
            out, wall, c = run(model, rq, e)
            outs[name] = out
            row[name] = {"denoiser_steps": c["denoiser_calls"],
                         "context_forwards": c["context_calls"] + c["prefill_calls"],
                         "row_steps": sum(r.stats.steps for r in out.values()),
                         "tokens": sum(r.stats.completion_tokens for r in out.values()), "wall_s": round(wall, 3),
                         "stopped": sum(r.stats.finish_reason == "stop" for r in out.values())}
        row["stop_rows_are_limit_rows_cut"] = all(
            outs["limit"][i].tokens[: len(r.tokens)] == r.tokens for i, r in outs["stop"].items())
        lim, st = row["limit"], row["stop"]
        key = "row_steps"
        row["steps_saved"] = round(1 - st[key] / lim[key], 3) if lim[key] else 0.0
        row["wall_ratio_limit_over_stop"] = round(lim["wall_s"] / st["wall_s"], 2) if st["wall_s"] else None
        results.append(row)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.rows} prompts, max_new_tokens {args.max_new_tokens}, block 16, gamma {args.gamma}, "
          f"{args.threads} thread(s); stop string {stop!r} (EOS ignored)")
    print(f"{'mode':12} {'run':6} {'row steps':>10} {'batched den.':>12} {'ctx fwd':>8} {'tokens':>7} {'stopped':>8} "
          f"{'wall s':>7}")
    for row in results:
        for name in ("limit", "stop", "eos"):
            r = row[name]
            print(f"{row['mode']:12} {name:6} {r['row_steps']:>10} {r['denoiser_steps']:>12} "
                  f"{r['context_forwards']:>8} {r['tokens']:>7} {r['stopped']:>8} {r['wall_s']:>7}")
        print(f"{'':12} steps saved by the stop string: {row['steps_saved']:.1%}; wall limit/stop "
              f"{row['wall_ratio_limit_over_stop']}x; "
              f"stop rows = limit rows cut: {row['stop_rows_are_limit_rows_cut']}")


if __name__ == "__main__":
    main()
