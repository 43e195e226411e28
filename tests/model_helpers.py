"""Small random TwoTower models for the model tests (not a test module)."""

from __future__ import annotations

import dataclasses

import torch

from twotower_cli.config import ModelConfig
from twotower_cli.model.twotower import TwoTower


def tiny_cfg(**changes) -> ModelConfig:
    """ModelConfig.tiny() (every layer kind: "M*EM-E") with changes, e.g. a one-layer pattern."""
    cfg = ModelConfig.tiny()
    if "hybrid_override_pattern" in changes:
        changes.setdefault("num_hidden_layers", len(changes["hybrid_override_pattern"]))
    return dataclasses.replace(cfg, **changes)


@torch.no_grad()
def random_model(cfg: ModelConfig | None = None, seed: int = 0, ar_only: bool = False) -> TwoTower:
    """A TwoTower whose every parameter is random and nonzero, at scales where each layer matters:
    weights std ~0.1, norms ~1, nonzero biases, correction biases and adaLN tables."""
    cfg = cfg or tiny_cfg()
    model = TwoTower(cfg, ar_only=ar_only, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(p.shape, generator=g)
        if leaf in ("A_log", "dt_bias"):
            p.add_(0.3 * noise)
        elif leaf == "D" or name.endswith(("norm.weight", "norm_f.weight")):
            p.copy_(1.0 + 0.2 * noise)
        elif leaf == "e_score_correction_bias":
            p.copy_(0.3 * noise)
        elif leaf == "bias":
            p.copy_(0.1 * noise)
        elif "scale_shift_tables" in name:
            p.copy_(0.3 * noise)
        elif p.dim() >= 2:
            p.copy_(0.1 * noise)
    return model.eval()


@torch.no_grad()
def peaked_model(seed: int, scale: float = 6.0) -> TwoTower:
    """`random_model` with both heads scaled: decisions have margins, as a trained model's do, so
    that floating-point batch effects (~1e-7) do not flip near-ties."""
    m = random_model(seed=seed)
    m.lm_head.weight.mul_(scale)
    m.context_lm_head.weight.mul_(scale)
    return m


def rand_ids(shape, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
