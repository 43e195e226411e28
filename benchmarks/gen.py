"""`twotower gen` end to end: CLI overhead over the bare engine, prefill padding with and without
length bucketing, and peak memory for a small vs a large input.

    python benchmarks/gen.py [--model DIR] [--rows 512] [--rss-rows 1000,100000] [--json]

Model: the embedded checkpoint (twotower_cli/assets/tiny) when this build has one, else a random
tiny model written to a temporary directory (the output says which). Prompts are synthetic, with
heavy-tailed (lognormal) lengths. Everything runs on the CPU with --threads torch threads.

1. overhead   The same prompts, settings and batch limits through
                engine    `Engine(model).run(requests)` on prompts tokenized beforehand (untimed) and
                          given in the batcher's order, so it does exactly the pipeline's decoding work;
                pipeline  `pipeline.run(RunConfig)` in this process with the same loaded model: read
                          JSONL, validate, tokenize, bucket, decode, detokenize, write + fsync Parquet;
                cli       `twotower gen` in a subprocess; its rows/s use the summary's elapsed_s, i.e.
                          without interpreter start-up, imports and model load (reported apart).
              Best of --repeats runs each, interleaved. overhead = engine rows/s / pipeline rows/s - 1.
2. padding    Prefill padding waste = 1 - prefill_tokens / prefill_padded_tokens (Engine.counters)
              for the prompts in arrival order vs the batcher's length-sorted look-ahead window.
              AR with one new token: every row leaves after its prefill, so every admission is a
              full batch of max_batch_rows rows (the most padding the engine can see).
3. rss        Peak RSS (ru_maxrss) of a `twotower gen --mode ar --max-new-tokens 1` process on inputs
              of each size, started through a small launcher (see _LAUNCH: a direct child would
              inherit this process's own peak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import torch

from twotower_cli import ModelConfig, TwoTower, save_pretrained
from twotower_cli.batcher import Batcher, BatchPolicy
from twotower_cli.config import DecodeParams
from twotower_cli.engine import Engine, Request
from twotower_cli.io.reader import read_rows
from twotower_cli.io.schema import PromptRow
from twotower_cli.model.checkpoint import default_checkpoint, fingerprint, load_model
from twotower_cli.model.tokenizer import load_tokenizer
from twotower_cli.pipeline import RunConfig
from twotower_cli.pipeline import run as run_pipeline

CHARS = "0123456789+-*= abcdefghij"


def lognormal_lengths(n: int, median: int, sigma: float, cap: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [max(2, min(cap, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def write_prompts(path: Path, lengths: list[int], seed: int) -> None:
    """JSONL with ids and prompts of the given character lengths (streamed: no list of rows)."""
    rng = random.Random(seed)
    with open(path, "wb", buffering=1 << 20) as f:
        for i, n in enumerate(lengths):
            f.write(orjson.dumps({"id": f"p{i}", "prompt": "".join(rng.choices(CHARS, k=n))}) + b"\n")


def write_many(path: Path, n: int, seed: int) -> None:
    """n prompts (for the RSS runs), lengths lognormal around 40 chars, without holding them."""
    rng = random.Random(seed)
    with open(path, "wb", buffering=1 << 20) as f:
        for i in range(n):
            k = max(2, min(400, int(rng.lognormvariate(math.log(40), 0.8))))
            f.write(orjson.dumps({"id": f"p{i}", "prompt": "".join(rng.choices(CHARS, k=k))}) + b"\n")


def model_dir(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), f"--model {arg}"
    emb = default_checkpoint()
    if emb is not None:
        return emb, f"embedded ({emb})"
    from twotower_cli.training.tokenizer_build import save_tokenizer, vocab

    d = tmp / "tiny-random"
    save_pretrained(TwoTower(ModelConfig.tiny(vocab_size=len(vocab())), seed=0), d)
    save_tokenizer(d)
    return d, "random tiny (ModelConfig.tiny, seed 0; no embedded model in this build)"


def batcher_order(src: Path, tok, params: DecodeParams, model, window: int) -> list[Request]:
    b = Batcher(tok, params, model.config.max_position_embeddings, BatchPolicy(window=window),
                vocab_size=model.config.vocab_size)
    return [r for r in b(read_rows(src)) if isinstance(r, Request)]


def arrival_order(src: Path, tok, params: DecodeParams, model) -> list[Request]:
    b = Batcher(tok, params, model.config.max_position_embeddings, vocab_size=model.config.vocab_size)
    return [r for row in read_rows(src) if isinstance(row, PromptRow) and isinstance(r := b.encode(row), Request)]


def simulate_admission(lens: list[int], rows: int, tokens: int, max_padding: float) -> tuple[int, int, int]:
    """The engine's prefill admission replayed on token lengths when every row leaves after its
    prefill (AR x 1 token): take rows in order while they fit `rows`, the padded `tokens` budget
    and the `max_padding` share. Returns (real tokens, padded tokens, prefill calls) as
    Engine.counters counts them -- a check that the benchmark measures the rule it describes."""
    real = padded = calls = i = 0
    while i < len(lens):
        free = rows  # one engine iteration: prefills fill the free slots, then every row leaves
        while free and i < len(lens):
            n = longest = s = 0
            while i < len(lens) and n < free:
                m = max(longest, lens[i])
                if n and (m * (n + 1) > tokens or 1 - (s + lens[i]) / (m * (n + 1)) > max_padding):
                    break
                n, longest, s, i = n + 1, m, s + lens[i], i + 1
            real, padded, calls, free = real + s, padded + longest * n, calls + 1, free - n
    return real, padded, calls


def fresh(reqs: list[Request]) -> list[Request]:
    return [Request(r.id, list(r.prompt_ids), r.params, r.meta) for r in reqs]


def engine_pass(model, reqs: list[Request], B: int, max_tokens: int, max_padding: float = 0.05
                ) -> tuple[float, dict, int]:
    eng = Engine(model, max_batch_rows=B, max_batch_tokens=max_tokens, max_padding=max_padding)
    t0 = time.perf_counter()
    n = sum(1 for _ in eng.run(fresh(reqs)))
    return time.perf_counter() - t0, dict(eng.counters), n


def pipeline_pass(src: Path, out: Path, model, tok, mdir: Path, params: DecodeParams, B: int,
                  max_tokens: int) -> tuple[float, dict]:
    cfg = RunConfig(source=str(src), out_dir=out, model=model, tokenizer=tok, model_name=mdir.name,
                    model_fingerprint=fingerprint(mdir), defaults=params, max_batch_rows=B,
                    max_batch_tokens=max_tokens)
    t0 = time.perf_counter()
    s = run_pipeline(cfg)
    return time.perf_counter() - t0, s


def cli_argv(src: Path, out: Path, mdir: Path, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "twotower_cli", "gen", str(src), "-o", str(out), "--model", str(mdir), "-q", *flags]


# Peak RSS must be measured on a process that never shared this one's memory: a child of this
# (large) process inherits its high-water mark through fork/vfork + exec (Linux carries the
# pre-exec mm's hiwater into the new image's maxrss), so RUSAGE_CHILDREN or os.wait4 on a direct
# child would report at least this process's own peak. A small launcher forks the real child.
_LAUNCH = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.argv[2], sys.argv[2:])\n"
           "_, st, ru = os.wait4(pid, 0)\nopen(sys.argv[1], 'w').write(str(ru.ru_maxrss))\n"
           "sys.exit(os.waitstatus_to_exitcode(st))\n")


def cli_pass(argv: list[str], threads: int) -> tuple[float, dict, float]:
    """Run `twotower gen`; returns (wall s, summary, peak RSS MB of that process alone)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se, \
            tempfile.NamedTemporaryFile("r", suffix=".maxrss") as rss:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _LAUNCH, rss.name, *argv], stdout=so, stderr=se, env=env)
        wall = time.perf_counter() - t0
        so.seek(0)
        se.seek(0)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {p.returncode}: {se.read().decode()[-2000:]}")
        summary = json.loads(so.read().decode().strip().splitlines()[-1])
        maxrss_kib = int(open(rss.name).read())
    return wall, summary, maxrss_kib / 1024  # Linux: KiB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: embedded, else random tiny)")
    ap.add_argument("--rows", type=int, default=512, help="prompts for the overhead runs")
    ap.add_argument("--pad-rows", type=int, default=8192, help="prompts for the padding runs")
    ap.add_argument("--rss-rows", default="1000,100000", help="input sizes for the peak-RSS runs")
    ap.add_argument("--mode", default="diffusion", choices=["diffusion", "mock-ar", "ar"])
    ap.add_argument("--gamma", type=float, default=0.8)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-batch-rows", type=int, default=32)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=2048, help="the batcher's look-ahead window")
    ap.add_argument("--median-chars", type=int, default=60)
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of prompt lengths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: overhead,padding,rss")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    torch.set_num_threads(a.threads)
    report: dict = {"threads": a.threads, "device": "cpu"}
    log = (lambda *m: None) if a.json else (lambda *m: print(*m, flush=True))

    with tempfile.TemporaryDirectory(prefix="twotower-bench-") as tmp_s:
        tmp = Path(tmp_s)
        mdir, which = model_dir(a.model, tmp)
        report["model"] = which
        log(f"model: {which}; torch threads {a.threads}; CPU")
        model = load_model(mdir).eval()
        tok = load_tokenizer(mdir)
        cap = model.config.max_position_embeddings - a.max_new_tokens - 2  # BOS + margin

        # ---- 1. overhead -----------------------------------------------------------------------
        if "overhead" not in skip:
            src = tmp / "overhead.jsonl"
            write_prompts(src, lognormal_lengths(a.rows, a.median_chars, a.sigma, cap, seed=1), seed=2)
            params = DecodeParams(mode=a.mode, gamma=a.gamma, block_size=a.block, max_new_tokens=a.max_new_tokens)
            reqs = batcher_order(src, tok, params, model, a.window)
            assert len(reqs) == a.rows
            # Warm both sides up (first-call costs: allocator, lazy imports of the Parquet writer, ...).
            warm = tmp / "warm.jsonl"
            write_prompts(warm, lognormal_lengths(a.max_batch_rows, a.median_chars, a.sigma, cap, seed=9), seed=9)
            engine_pass(model, reqs[: a.max_batch_rows], a.max_batch_rows, a.max_batch_tokens)
            pipeline_pass(warm, tmp / "warm-out", model, tok, mdir, params, a.max_batch_rows, a.max_batch_tokens)
            eng_t, pipe_t, cli_s, pipe_sum, counters = [], [], [], None, None
            for i in range(a.repeats):
                t, counters, n = engine_pass(model, reqs, a.max_batch_rows, a.max_batch_tokens)
                eng_t.append(t)
                t, pipe_sum = pipeline_pass(src, tmp / f"pipe{i}", model, tok, mdir, params, a.max_batch_rows,
                                            a.max_batch_tokens)
                assert pipe_sum["rows_written"] == a.rows
                pipe_t.append(t)
                log(f"  run {i}: engine {eng_t[-1]:.2f} s, pipeline {pipe_t[-1]:.2f} s")
            flags = ["--mode", a.mode, "--gamma", str(a.gamma), "--block", str(a.block), "--max-new-tokens",
                     str(a.max_new_tokens), "--max-batch-rows", str(a.max_batch_rows), "--max-batch-tokens",
                     str(a.max_batch_tokens)]
            for i in range(max(1, a.repeats - 1)):
                wall, s, _ = cli_pass(cli_argv(src, tmp / f"cli{i}", mdir, flags), a.threads)
                cli_s.append((s["elapsed_s"], wall))
            e, p = min(eng_t), min(pipe_t)
            c_el, c_wall = min(cli_s)
            ov = {
                "rows": a.rows, "mode": a.mode, "gamma": a.gamma, "block": a.block,
                "max_new_tokens": a.max_new_tokens, "max_batch_rows": a.max_batch_rows,
                "completion_tokens": pipe_sum["completion_tokens"],
                "engine_s": round(e, 3), "engine_rows_per_s": round(a.rows / e, 2),
                "pipeline_s": round(p, 3), "pipeline_rows_per_s": round(a.rows / p, 2),
                "pipeline_overhead_pct": round(100 * (p / e - 1), 2),
                "cli_elapsed_s": c_el, "cli_rows_per_s": round(a.rows / c_el, 2),
                "cli_overhead_pct": round(100 * (c_el / e - 1), 2),
                "cli_startup_s": round(c_wall - c_el, 2), "cli_wall_s": round(c_wall, 2),
                "engine_runs_s": [round(x, 3) for x in eng_t], "pipeline_runs_s": [round(x, 3) for x in pipe_t],
                "engine_padding_waste": round(1 - counters["prefill_tokens"] / counters["prefill_padded_tokens"], 4),
            }
            report["overhead"] = ov
            log("\n1. CLI overhead over the bare engine (same prompts, settings, batch limits, order)")
            log(f"   {a.rows} prompts, mode {a.mode}, gamma {a.gamma}, block {a.block}, max_new_tokens "
                f"{a.max_new_tokens}, max_batch_rows {a.max_batch_rows}; best of {a.repeats}")
            log(f"   {'':<36}{'seconds':>9}{'rows/s':>10}{'overhead':>10}")
            log(f"   {'engine (pre-tokenized)':<36}{e:>9.2f}{a.rows / e:>10.1f}{'':>10}")
            log(f"   {'pipeline.run (in process)':<36}{p:>9.2f}{a.rows / p:>10.1f}{ov['pipeline_overhead_pct']:>9.1f}%")
            log(f"   {'twotower gen (subprocess, elapsed)':<36}{c_el:>9.2f}{a.rows / c_el:>10.1f}"
                f"{ov['cli_overhead_pct']:>9.1f}%")
            log(f"   twotower gen wall {c_wall:.2f} s = elapsed + {c_wall - c_el:.2f} s start-up (imports, model load)")

        # ---- 2. padding ---------------------------------------------------------------------------
        if "padding" not in skip:
            src = tmp / "padding.jsonl"
            lens = lognormal_lengths(a.pad_rows, a.median_chars, a.sigma, cap, seed=3)
            write_prompts(src, lens, seed=4)
            params = DecodeParams(mode="ar", max_new_tokens=1)
            pad = {"rows": a.pad_rows, "lognormal_median_chars": a.median_chars, "sigma": a.sigma,
                   "max_chars": max(lens), "mean_chars": round(sum(lens) / len(lens), 1),
                   "max_batch_rows": a.max_batch_rows}
            log(f"\n2. Prefill padding waste, {a.pad_rows} prompts, lognormal lengths (median {a.median_chars} "
                f"chars, sigma {a.sigma}, mean {pad['mean_chars']}, max {pad['max_chars']}), "
                f"AR x 1 token, max_batch_rows {a.max_batch_rows}")
            orders = [("arrival order", arrival_order(src, tok, params, model))]
            orders += [(f"batcher, window {w}" + (" (whole input)" if w >= a.pad_rows else ""),
                        batcher_order(src, tok, params, model, w)) for w in sorted({a.window, a.pad_rows})]
            for name, reqs in orders:
                lens = [len(r.prompt_ids) for r in reqs]
                pad[name] = {}
                for cap in (1.0, 0.05):  # 1.0: no padding cap (budget and rows only); 0.05: the default
                    t, c, _ = engine_pass(model, reqs, a.max_batch_rows, a.max_batch_tokens, cap)
                    sim = simulate_admission(lens, a.max_batch_rows, a.max_batch_tokens, cap)
                    assert sim == (c["prefill_tokens"], c["prefill_padded_tokens"], c["prefill_calls"]), (sim, c)
                    waste = 1 - c["prefill_tokens"] / c["prefill_padded_tokens"]
                    pad[name][f"max_padding_{cap}"] = {
                        "waste": round(waste, 4), "prefill_tokens": c["prefill_tokens"],
                        "prefill_padded_tokens": c["prefill_padded_tokens"], "prefill_calls": c["prefill_calls"],
                        "seconds": round(t, 2)}
                    log(f"   {name:<34} max_padding {cap:<4} waste {100 * waste:6.2f}%  ({c['prefill_tokens']:,} "
                        f"real / {c['prefill_padded_tokens']:,} padded tokens, {c['prefill_calls']} prefills, "
                        f"{t:.1f} s)")
            report["padding"] = pad

        # ---- 3. peak RSS ----------------------------------------------------------------------------
        if "rss" not in skip:
            rss = []
            log("\n3. Peak RSS of `twotower gen --mode ar --max-new-tokens 1` (this child alone)")
            for n in [int(x) for x in a.rss_rows.split(",") if x]:
                src = tmp / f"rss{n}.jsonl"
                write_many(src, n, seed=5)
                argv_ = cli_argv(src, tmp / f"rss-out{n}", mdir, ["--mode", "ar", "--max-new-tokens", "1"])
                wall, s, mb = cli_pass(argv_, a.threads)
                assert s["rows_written"] == n, s
                rss.append({"rows": n, "peak_rss_mb": round(mb, 1), "wall_s": round(wall, 1),
                            "elapsed_s": s["elapsed_s"], "rows_per_s": s["rows_per_s"],
                            "input_mb": round(src.stat().st_size / 2**20, 1)})
                log(f"   {n:>8,} prompts ({rss[-1]['input_mb']} MB of JSONL): peak RSS {mb:7.1f} MB, "
                    f"{wall:.1f} s wall, {s['rows_per_s']:.0f} rows/s")
                src.unlink()
            report["rss"] = rss
    if a.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
