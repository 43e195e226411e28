"""Streamlined engine vs the lockstep reference (engine/reference.py), side by side in one run.

    python benchmarks/engine.py [--model DIR] [--rows 64] [--batches 1,8,32] [--mode diffusion]

Prompts: the held-out task prompts of the embedded model (mixed lengths, rows ending at different
times through EOS). Both sides decode the same prompts with the same settings on the same model;
the reference runs them in lockstep batches of B (a batch ends when its slowest row does), the
engine with B slots refilled as rows finish. Reports rows/s, generated tokens/s, denoiser forwards
(NFE: one batched denoiser call counts once), the speed ratio and whether every row's tokens agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from twotower_cli.config import DecodeParams
from twotower_cli.engine import Engine, Request
from twotower_cli.engine import reference as ref
from twotower_cli.engine.request import row_key
from twotower_cli.model.checkpoint import ASSET_CHECKPOINT, load_model
from twotower_cli.model.tokenizer import load_tokenizer
from twotower_cli.training.tasks import eval_set


class CountingModel:
    """Counts batched denoiser and context forwards of a model (a thin proxy, same results)."""

    def __init__(self, model):
        self.m, self.denoise_calls, self.context_calls = model, 0, 0

    def __getattr__(self, name):
        return getattr(self.m, name)

    def denoise(self, *a, **k):
        self.denoise_calls += 1
        return self.m.denoise(*a, **k)

    def context_extend(self, *a, **k):
        self.context_calls += 1
        return self.m.context_extend(*a, **k)

    def prefill(self, *a, **k):  # one batched context forward (the engine's prefill)
        self.context_calls += 1
        return self.m.prefill(*a, **k)


def run_reference(model, prompts, params, B, eos):
    fn = {"ar": ref.generate_ar, "mock-ar": ref.generate_mock_ar, "diffusion": ref.generate_mask_diffusion}
    out = []
    for i in range(0, len(prompts), B):
        chunk = prompts[i : i + B]
        keys = [row_key(str(j)) for j in range(i, i + len(chunk))]
        out += [r[0] for r in fn[params.mode](model, chunk, [params] * len(chunk), keys, eos)]
    return out


def run_engine(model, prompts, params, B, eos):
    reqs = [Request(str(i), p, params) for i, p in enumerate(prompts)]
    res = {r.id: r.tokens for r in Engine(model, max_batch_rows=B, eos_ids=eos).run(reqs)}
    return [res[str(i)] for i in range(len(prompts))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ASSET_CHECKPOINT))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--mode", default="diffusion", choices=["diffusion", "mock-ar", "ar"])
    ap.add_argument("--gamma", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model(a.model).eval()
    tok = load_tokenizer(a.model)
    items = eval_set(n_per_task=(a.rows + 4) // 5)[: a.rows]
    items = [items[(i * 7) % len(items)] for i in range(len(items))]  # interleave tasks: mixed lengths
    prompts = [tok.encode(p) for _, p, _ in items]  # with BOS, as the pipeline encodes
    params = DecodeParams(mode=a.mode, gamma=a.gamma, max_new_tokens=a.max_new_tokens)
    eos = set(model.config.eos_ids)
    rows = []
    for B in [int(x) for x in a.batches.split(",")]:
        res = {}
        for name, fn in (("reference", run_reference), ("engine", run_engine)):
            cm = CountingModel(model)
            t0 = time.perf_counter()
            toks = fn(cm, prompts, params, B, eos)
            dt = time.perf_counter() - t0
            res[name] = (toks, dt, cm.denoise_calls, cm.context_calls)
        (rt, rdt, rnfe, rctx), (et, edt, enfe, ectx) = res["reference"], res["engine"]
        gen = sum(len(t) for t in et)
        row = {"batch": B, "rows": len(prompts), "mode": a.mode, "gamma": a.gamma,
               "ref_s": round(rdt, 3), "engine_s": round(edt, 3),
               "ref_rows_per_s": round(len(prompts) / rdt, 2), "engine_rows_per_s": round(len(prompts) / edt, 2),
               "ref_tokens_per_s": round(sum(len(t) for t in rt) / rdt, 1), "engine_tokens_per_s": round(gen / edt, 1),
               "ref_denoiser_calls": rnfe, "engine_denoiser_calls": enfe,
               "ref_context_calls": rctx, "engine_context_calls": ectx,
               "speedup": round(rdt / edt, 2), "identical_rows": sum(x == y for x, y in zip(rt, et))}
        rows.append(row)
        if not a.json:
            print(f"B={B:>3}  reference {row['ref_rows_per_s']:>7.2f} rows/s {row['ref_tokens_per_s']:>8.1f} tok/s "
                  f"({rnfe} denoiser calls)  engine {row['engine_rows_per_s']:>7.2f} rows/s "
                  f"{row['engine_tokens_per_s']:>8.1f} tok/s ({enfe} calls)  x{row['speedup']:.2f}  "
                  f"identical {row['identical_rows']}/{len(prompts)}", file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
