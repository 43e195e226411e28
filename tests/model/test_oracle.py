"""Our context tower against transformers' in-tree NemotronH on the same random weights."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from model_helpers import rand_ids, random_model, tiny_cfg

if importlib.util.find_spec("mamba_ssm") is not None:  # transformers would route into CUDA kernels
    pytest.skip("mamba_ssm is importable: the CPU oracle would not use its torch path", allow_module_level=True)

nemotron_h = pytest.importorskip("transformers.models.nemotron_h")


def hf_twin(model):
    """transformers' NemotronHForCausalLM holding our context tower's weights."""
    cfg = model.config
    hf_cfg = nemotron_h.NemotronHConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        hybrid_override_pattern=cfg.hybrid_override_pattern,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        mamba_num_heads=cfg.mamba_num_heads,
        mamba_head_dim=cfg.mamba_head_dim,
        ssm_state_size=cfg.ssm_state_size,
        n_groups=cfg.n_groups,
        conv_kernel=cfg.conv_kernel,
        chunk_size=cfg.chunk_size,
        use_conv_bias=cfg.use_conv_bias,
        mamba_proj_bias=cfg.mamba_proj_bias,
        mamba_hidden_act="silu",
        use_bias=False,
        mlp_bias=False,
        n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size,
        n_shared_experts=cfg.n_shared_experts,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        intermediate_size=cfg.intermediate_size,
        mlp_hidden_act="relu2",
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        n_group=1,
        topk_group=1,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        tie_word_embeddings=False,
    )
    hf_cfg._attn_implementation = "eager"
    hf = nemotron_h.NemotronHForCausalLM(hf_cfg).eval()
    ours = dict(model.named_parameters())
    sd = {}
    for name, t in ours.items():
        if name == "context_lm_head.weight":
            sd["lm_head.weight"] = t
        elif name.startswith("context_tower.") and ".experts." not in name:
            sd["model." + name.removeprefix("context_tower.")] = t
    for i, kind in enumerate(cfg.layer_kinds):  # per-expert linears -> fused (E, out, in) tensors
        if kind == "moe":
            for proj in ("up_proj", "down_proj"):
                sd[f"model.layers.{i}.mixer.experts.{proj}"] = torch.stack(
                    [ours[f"context_tower.layers.{i}.mixer.experts.{e}.{proj}.weight"]
                     for e in range(cfg.n_routed_experts)]
                )
    result = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for layer in hf.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (0.0, float("inf"))  # the release does not clamp dt
    return hf


@pytest.mark.parametrize("pattern", ["M*EM-E", "*M-EEM"])
def test_context_tower_matches_transformers(pattern):
    model = random_model(tiny_cfg(hybrid_override_pattern=pattern), seed=3, ar_only=True)
    with torch.no_grad():
        # Some heads get dt below transformers' default time_step_min: checks the clamp is off.
        for layer in model.context_tower.layers:
            if layer.kind == "mamba":
                layer.mixer.dt_bias[:2] = -9.0
        hf = hf_twin(model)
        # The correction bias is a buffer in transformers; it must be ours and nonzero.
        i = pattern.index("E")
        bias = hf.model.layers[i].mixer.gate.e_score_correction_bias
        assert torch.equal(bias, model.context_tower.layers[i].mixer.gate.e_score_correction_bias)
        assert bias.abs().min() > 0
        ids = rand_ids((2, 19), model.config.vocab_size, seed=5)  # 19 > chunk_size 8: several chunks
        ref = hf(input_ids=ids, use_cache=False).logits.float()
        ours = model.context_logits(ids)
    assert ref.abs().max() > 0.5  # logits of a useful scale (weights large enough to matter)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_incremental_context_matches_transformers_full_forward():
    """Prefill 11 tokens, then extend by 1 and by 5: each last-token logit equals transformers'."""
    model = random_model(seed=4, ar_only=True)
    ids = rand_ids((1, 17), model.config.vocab_size, seed=6)
    with torch.no_grad():
        ref = hf_twin(model)(input_ids=ids, use_cache=False).logits.float()[0]
        state = model.new_state(1)
        for a, b in ((0, 11), (11, 12), (12, 17)):
            got = model.context_extend(ids[:, a:b], state, logits=True)[0]
            torch.testing.assert_close(got, ref[b - 1], atol=1e-4, rtol=1e-4)


def test_checkpoint_written_by_transformers_loads_ar_only(tmp_path):
    """transformers' save_pretrained of NemotronH (config with `layers_block_type`, nulls; weights
    `backbone.*` with one key per expert) loads as our context tower with the same logits."""
    from twotower_cli import load_model

    model = random_model(seed=8, ar_only=True)
    hf = hf_twin(model)
    hf.save_pretrained(str(tmp_path))
    loaded = load_model(tmp_path)
    assert loaded.ar_only and loaded.config.hybrid_override_pattern == model.config.hybrid_override_pattern
    ids = rand_ids((2, 9), model.config.vocab_size, seed=9)
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits.float()
        torch.testing.assert_close(loaded.context_logits(ids), ref, atol=1e-4, rtol=1e-4)
