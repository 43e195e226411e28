"""MoE: both implementations (grouped by expert for many tokens, dense over all experts for a
few) == a plain per-token loop; the correction bias picks experts but the weights come from the
raw scores."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import random_model, tiny_cfg

from twotower_cli.model.twotower import MoE


def moe_layer(seed=0, dense_max=MoE.DENSE_MAX_TOKENS, **changes) -> MoE:
    cfg = tiny_cfg(**changes)
    moe = random_model(cfg, seed=seed, ar_only=True).context_tower.layers[2].mixer  # "M*EM-E"
    moe.DENSE_MAX_TOKENS = dense_max  # on the instance: 0 = always grouped, 10**9 = always dense
    return moe


PATHS = pytest.mark.parametrize("dense_max", [0, 10**9], ids=["grouped", "dense"])


def per_token(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """SPEC §2 written out, one token at a time."""
    cfg = moe.cfg
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        scores = torch.sigmoid(tok.double() @ moe.gate.weight.double().t())  # (E,)
        choice = scores + moe.gate.e_score_correction_bias.double()
        chosen = sorted(range(len(scores)), key=lambda e: -choice[e].item())[: cfg.num_experts_per_tok]
        w = [scores[e].item() for e in chosen]
        if cfg.norm_topk_prob:
            total = sum(w) + 1e-20
            w = [wi / total for wi in w]
        y = moe.shared_experts.down_proj(torch.relu(moe.shared_experts.up_proj(tok)) ** 2)
        for e, wi in zip(chosen, w, strict=True):
            ex = moe.experts[e]
            y = y + wi * cfg.routed_scaling_factor * ex.down_proj(torch.relu(ex.up_proj(tok)) ** 2)
        out.append(y)
    return torch.stack(out).view(x.shape)


@PATHS
def test_moe_equals_per_token_loop(dense_max):
    moe = moe_layer(seed=1, dense_max=dense_max)
    x = torch.randn(3, 7, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), per_token(moe, x), atol=1e-5, rtol=1e-5)


@PATHS
def test_moe_without_normalisation_equals_loop(dense_max):
    moe = moe_layer(seed=3, dense_max=dense_max, norm_topk_prob=False, routed_scaling_factor=1.0, num_experts_per_tok=3)
    x = torch.randn(5, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), per_token(moe, x), atol=1e-5, rtol=1e-5)


@PATHS
def test_correction_bias_chooses_but_raw_scores_weigh(dense_max):
    moe = moe_layer(seed=5, dense_max=dense_max)  # 4 experts, top-2
    H = moe.cfg.hidden_size
    raw = torch.tensor([0.9, 0.8, 0.3, 0.1])  # raw scores: experts 0 and 1 would win
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, 0] = torch.log(raw / (1 - raw))  # sigmoid(w · e0) = raw
        x = torch.zeros(1, H)
        x[0, 0] = 1.0
        moe.gate.e_score_correction_bias.zero_()
        idx, w = moe.route(x)
        assert sorted(idx[0].tolist()) == [0, 1]
        moe.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.75]))  # 0.1+0.75 > 0.8
        idx, w = moe.route(x)
        assert sorted(idx[0].tolist()) == [0, 3]  # the bias flipped expert 1 -> expert 3
        weights = dict(zip(idx[0].tolist(), w[0].tolist(), strict=True))
        scale = moe.cfg.routed_scaling_factor
        assert math.isclose(weights[0], 0.9 / (0.9 + 0.1) * scale, rel_tol=1e-6)  # raw, not biased
        assert math.isclose(weights[3], 0.1 / (0.9 + 0.1) * scale, rel_tol=1e-6)
        torch.testing.assert_close(moe(x), per_token(moe, x), atol=1e-5, rtol=1e-5)


@PATHS
def test_moe_with_biases_equals_loop(dense_max):
    moe = moe_layer(seed=6, dense_max=dense_max, mlp_bias=True)
    with torch.no_grad():
        for p in moe.parameters():
            if p.dim() == 1 and p is not moe.gate.e_score_correction_bias:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    x = torch.randn(2, 5, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), per_token(moe, x), atol=1e-5, rtol=1e-5)


def test_dense_stack_cache_follows_weight_changes():
    """The dense path caches the stacked expert weights outside autograd: an in-place update or a
    replaced weight must be seen by the next call, and under autograd gradients reach the experts."""
    moe = moe_layer(seed=9, dense_max=10**9)
    x = torch.randn(4, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        moe(x)  # fills the cache
        for e in moe.experts:
            e.up_proj.weight.mul_(2.0)  # in place
        torch.testing.assert_close(moe(x), per_token(moe, x), atol=1e-5, rtol=1e-5)
        for e in moe.experts:
            e.down_proj.weight = torch.nn.Parameter(e.down_proj.weight * -1)  # replaced
        torch.testing.assert_close(moe(x), per_token(moe, x), atol=1e-5, rtol=1e-5)
    moe(x).sum().backward()
    assert all(e.up_proj.weight.grad is not None for e in moe.experts)


def test_dense_and_grouped_paths_give_the_same_gradients():
    """Training runs both paths (mock-AR rows are few tokens, diffusion blocks many): the dense
    path's in-place gating must leave autograd exact."""
    grads = []
    for dense_max in (0, 10**9):
        moe = moe_layer(seed=11, dense_max=dense_max, mlp_bias=True)
        x = torch.randn(6, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(12), requires_grad=True)
        (moe(x) * torch.linspace(-1, 1, moe.cfg.hidden_size)).sum().backward()
        grads.append([x.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in moe.parameters()
                                 if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_many_experts_never_take_the_dense_path():
    """With many experts (the release has 128) a few tokens still go through the grouped loop:
    no all-expert compute and no cached copy of the expert weights."""
    moe = moe_layer(seed=13, n_routed_experts=16, num_experts_per_tok=2)
    x = torch.randn(3, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), per_token(moe, x), atol=1e-5, rtol=1e-5)
    assert not hasattr(moe, "_fused_key")
