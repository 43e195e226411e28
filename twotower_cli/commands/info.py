"""`twotower info`: what a checkpoint or preset is, and how many parameters it has."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..config import LAYER_KINDS, ModelConfig
from ..errors import UserError


def load_model(path: Path, device: str = "meta"):
    """model.checkpoint.load_model, imported (with torch) on first call."""
    from ..model.checkpoint import load_model

    return load_model(path, device=device)


def collect(path: Path | None, preset: str | None) -> dict[str, Any]:
    """The facts `info` reports. A preset is described from its config alone (nothing allocated);
    a checkpoint is checked (keys and shapes against config.json) and its actual parameters counted,
    without reading tensor data."""
    from ..model.checkpoint import default_checkpoint, fingerprint, weight_dtypes

    if path is not None and preset is not None:
        raise UserError("give either a checkpoint PATH or --preset, not both")
    if path is None and preset is None:
        path = default_checkpoint()
        if path is None:
            presets = ", ".join(ModelConfig.PRESETS)
            raise UserError(f"give a checkpoint PATH or --preset NAME (presets: {presets})")
    out: dict[str, Any] = {}
    if preset is not None:
        cfg = ModelConfig.preset(preset)
        counts = cfg.param_counts()
        out.update(source=preset, kind="preset", ar_only=False, dtype=cfg.torch_dtype)
        out.update(
            params_context_tower=counts["params_per_tower"],
            params_denoiser_tower=counts["params_per_tower"],
            params_adaln=counts["params_adaln"],
        )
    else:
        model = load_model(path, device="meta")  # validates keys and shapes; allocates nothing
        cfg = model.config
        counts = cfg.param_counts()

        def count(*prefixes: str) -> int:
            return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))

        stored = weight_dtypes(path)
        out.update(source=str(path), kind="checkpoint", ar_only=model.ar_only)
        out.update(dtype=max(stored, key=stored.get) if stored else cfg.torch_dtype, stored_dtypes=stored)
        out.update(
            params_context_tower=count("context_tower.", "context_lm_head."),
            params_denoiser_tower=count("denoiser_tower.", "lm_head."),
            params_adaln=count("t_embedder.", "t_block.", "scale_shift_tables."),
            fingerprint=fingerprint(path),
        )
    kinds = Counter(cfg.layer_kinds)
    total = out["params_context_tower"] + out["params_denoiser_tower"] + out["params_adaln"]
    out.update(
        pattern=cfg.hybrid_override_pattern,
        num_hidden_layers=cfg.num_hidden_layers,
        layer_counts={k: kinds.get(k, 0) for k in LAYER_KINDS.values()},
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        params_per_tower=out["params_context_tower"],
        params_total=total,
        active_params_per_token=counts["active_params_per_token"],
        active_params_per_token_with_embeddings=counts["active_params_per_token_with_embeddings"],
    )
    return out


def human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def render(info: dict[str, Any]) -> str:
    lc = info["layer_counts"]
    rows = [
        ("source", f"{info['source']} ({info['kind']})"),
        ("modes", "AR only (no denoiser tower)" if info["ar_only"] else "diffusion, mock-AR, AR"),
        ("pattern", info["pattern"]),
        ("layers", f"{info['num_hidden_layers']}: " + ", ".join(f"{v} {k}" for k, v in lc.items())),
        ("hidden / vocab", f"{info['hidden_size']} / {info['vocab_size']}"),
        ("dtype", info["dtype"]),
        ("params per tower", f"{human(info['params_per_tower'])} ({info['params_per_tower']:,})"),
    ]
    if not info["ar_only"]:
        rows.append(("adaLN-single", f"{human(info['params_adaln'])} ({info['params_adaln']:,})"))
    rows += [
        ("params total", f"{human(info['params_total'])} ({info['params_total']:,})"),
        ("active per token", f"{human(info['active_params_per_token'])} per tower (no input embeddings)"),
    ]
    if "fingerprint" in info:
        rows.append(("fingerprint", info["fingerprint"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(path: Path | None, preset: str | None, as_json: bool) -> None:
    info = collect(path, preset)
    print(json.dumps(info, indent=2) if as_json else render(info))
