"""twotower_kernels on a GPU: each Triton kernel against its torch ref, time, agreement and memory.

    python benchmarks/kernels.py [--B 64] [--S 16] [--V 131072] [--reps 20]

- confidence (the denoiser step's token choice at the release vocab): greedy, sampled and mixed
  rows; the ref materialises softmax and the (B, S, V) Gumbel noise, the kernel streams V once.
- block scan (the denoiser's seeded 16-token Mamba-2 scan at the release head sizes): Triton vs
  the sequential recurrence (the ref) vs the chunked torch scan (the default "chunked" path).

Prints one JSON line per case (times in ms, from CUDA events, median of --reps after a warm-up
call that also compiles; peak memory above the inputs in MiB) and exits 0. Without CUDA it prints
"no CUDA: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

DEV = "cuda"


def timed(fn, reps: int) -> tuple[float, float, object]:
    """(first call ms incl. compile, median ms, result) with the peak memory counter reset."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return first, statistics.median(times), out


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_confidence(B: int, S: int, V: int, reps: int) -> None:
    from twotower_kernels.confidence import confidence_ref, confidence_triton

    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    logits = 4 * torch.randn(B, S, V, device=dev, generator=g)
    seed = torch.arange(B, device=dev)
    key = torch.randint(0, 2**62, (B,), device=dev, generator=g)
    step = torch.zeros(B, dtype=torch.long, device=dev)
    pos = torch.arange(S, device=dev).expand(B, S)
    cases = {
        "greedy": torch.zeros(B, device=dev),
        "sampled": torch.full((B,), 0.7, device=dev),
        "mixed": torch.where(torch.arange(B, device=dev) % 2 == 0, 0.0, 1.0),
    }
    for name, temp in cases.items():
        args = (logits, temp, seed, key, pos, step, 3)
        k_first, k_ms, (pk, ck) = timed(lambda a=args: confidence_triton(*a), reps)
        _, r_ms, (pr, cr) = timed(lambda a=args: confidence_ref(*a), max(3, reps // 4))
        rel = ((ck - cr).abs() / cr.abs().clamp_min(1e-30)).max().item()
        row = {
            "kernel": "confidence", "case": name, "B": B, "S": S, "V": V,
            "triton_ms": round(k_ms, 3), "triton_first_call_ms": round(k_first, 1), "ref_ms": round(r_ms, 3),
            "speedup": round(r_ms / k_ms, 1),
            "pred_equal": f"{int((pk == pr).sum())}/{pk.numel()}", "conf_max_rel_diff": rel,
            "triton_peak_mib": round(peak_mib(lambda a=args: confidence_triton(*a)), 1),
            "ref_peak_mib": round(peak_mib(lambda a=args: confidence_ref(*a)), 1),
            "logits_mib": round(logits.numel() * 4 / 2**20, 1),
        }
        print(json.dumps(row), flush=True)


def bench_scan(B: int, S: int, reps: int, nh: int = 64, P: int = 64, N: int = 128) -> None:
    from twotower_cli.model.twotower import ssd_chunked
    from twotower_kernels.ssd import ssd_ref, ssd_triton

    dev = DEV
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(B, S, nh, P, device=dev, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(B, S, nh, device=dev, generator=g) - 1)
    A = -torch.exp(0.5 * torch.randn(nh, device=dev, generator=g))
    Bm = torch.randn(B, S, nh, N, device=dev, generator=g)
    Cm = torch.randn(B, S, nh, N, device=dev, generator=g)
    state = torch.randn(B, nh, P, N, device=dev, generator=g)
    args = (x, dt, A, Bm, Cm, state)
    k_first, k_ms, (yk, sk) = timed(lambda: ssd_triton(*args), reps)
    _, r_ms, (yr, sr) = timed(lambda: ssd_ref(*args), reps)
    _, c_ms, (yc, sc) = timed(lambda: ssd_chunked(*args, S), reps)
    row = {
        "kernel": "block_scan", "B": B, "n": S, "nh": nh, "P": P, "N": N,
        "triton_ms": round(k_ms, 3), "triton_first_call_ms": round(k_first, 1),
        "sequential_ref_ms": round(r_ms, 3), "chunked_ms": round(c_ms, 3),
        "y_max_abs_diff": (yk - yr).abs().max().item(), "state_max_abs_diff": (sk - sr).abs().max().item(),
        "chunked_y_max_abs_diff": (yc - yr).abs().max().item(),
        "triton_peak_mib": round(peak_mib(lambda: ssd_triton(*args)), 1),
        "sequential_ref_peak_mib": round(peak_mib(lambda: ssd_ref(*args)), 1),
        "chunked_peak_mib": round(peak_mib(lambda: ssd_chunked(*args, S)), 1),
    }
    print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--S", type=int, default=16)
    ap.add_argument("--V", type=int, default=131072)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA: skipped")
        return 0
    import twotower_kernels as kernels

    if not kernels.HAS_TRITON:
        print("no triton: skipped (pip install triton==3.7.1)")
        return 0
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    with torch.no_grad():
        bench_confidence(a.B, a.S, a.V, a.reps)
        bench_scan(a.B, a.S, a.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
