"""Train the embedded tiny TwoTower from scratch and write it to twotower_cli/assets/tiny/.

    python examples/train_tiny.py                  # the shipped model (seed 0, ~27 min on 2 cores)
    python examples/train_tiny.py --out /tmp/tiny --ar-steps 50 --denoiser-steps 20   # a smoke run

Stage 1 trains the context tower as a causal LM on synthetic tasks with exact answers; stage 2
copies it into the denoiser tower, freezes it, and trains the denoiser with the block-diffusion
objective (see twotower_cli/training/train.py). training.json beside the weights records the
seed, steps, losses, time and held-out accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twotower_cli.training.train import TrainConfig, run  # noqa: E402


def main() -> None:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "twotower_cli" / "assets" / "tiny"))
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--ar-steps", type=int, default=d.ar_steps)
    ap.add_argument("--denoiser-steps", type=int, default=d.denoiser_steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--eval-per-task", type=int, default=d.eval_per_task)
    ap.add_argument("--threads", type=int, default=d.threads)
    a = ap.parse_args()
    tc = TrainConfig(
        seed=a.seed, ar_steps=a.ar_steps, denoiser_steps=a.denoiser_steps, batch_size=a.batch_size,
        eval_per_task=a.eval_per_task, threads=a.threads,
    )
    report = run(a.out, tc, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {a.out} in {report['seconds']['total']:.0f}s; "
          f"held-out AR {report['held_out']['ar']['accuracy']:.3f}, "
          f"diffusion(0.8) {report['held_out']['diffusion_gamma_0.8']['accuracy']:.3f}")


if __name__ == "__main__":
    main()
