"""The denoiser tower: layer-aligned attention over [context K/V ; block K/V] with no mask,
ragged contexts, adaLN-single order per layer kind, and mod=None == a plain pre-norm tower."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_helpers import rand_ids, random_model, tiny_cfg

TOL = dict(atol=1e-5, rtol=1e-5)


def prefill(model, seqs):
    """Ragged prefill of a list of 1-D id tensors (right-padded with garbage)."""
    n = max(len(s) for s in seqs)
    ids = rand_ids((len(seqs), n), model.config.vocab_size, seed=999)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
    state = model.new_state(len(seqs))
    with torch.no_grad():
        model.context_extend(ids, state, torch.tensor([len(s) for s in seqs]))
    return state


def attention_by_hand(attn, x, k_ctx, v_ctx):
    """One row: x (S, H) block input; k_ctx/v_ctx (L, Hkv, D) the context's keys and values.
    Softmax over all L+S keys, no mask; GQA: query head j uses kv head j // (Hq / Hkv)."""
    cfg = attn.cfg
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    S = x.shape[0]
    q = (x @ attn.q_proj.weight.t()).view(S, Hq, D)
    k = torch.cat([k_ctx, (x @ attn.k_proj.weight.t()).view(S, Hkv, D)])  # (L+S, Hkv, D)
    v = torch.cat([v_ctx, (x @ attn.v_proj.weight.t()).view(S, Hkv, D)])
    heads = []
    for j in range(Hq):
        kv = j // (Hq // Hkv)
        w = torch.softmax(q[:, j] @ k[:, kv].t() / math.sqrt(D), dim=-1)  # (S, L+S)
        heads.append(w @ v[:, kv])
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.t()


def context_kv_by_hand(model, seq, layer=0):
    """The context tower's layer-`layer` K/V of a sequence, recomputed from its weights
    (valid for a model whose first layer is that attention layer)."""
    cfg = model.config
    ctx = model.context_tower
    x = ctx.layers[layer].norm(ctx.embeddings(seq))  # (L, H)
    attn = ctx.layers[layer].mixer
    L = len(seq)
    k = (x @ attn.k_proj.weight.t()).view(L, cfg.num_key_value_heads, cfg.head_dim)
    v = (x @ attn.v_proj.weight.t()).view(L, cfg.num_key_value_heads, cfg.head_dim)
    return k, v


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def one_layer_by_hand(model, kind, blk, state, b, t_mod, seq, order=None):
    """The denoiser's single layer for row b, from SPEC §3 (t_mod: (3, H) or None). `order`:
    the layer kind whose adaLN order to use (default: this layer's own)."""
    den = model.denoiser_tower
    layer = den.layers[0]
    h = den.embeddings(blk[b])  # (S, H)
    if t_mod is None:
        x = layer.norm(h)
    elif (order or kind) in ("mamba", "attention"):
        x = layer.norm(modulate(h, t_mod[0], t_mod[1]))  # norm(modulate(h))
    else:
        x = modulate(layer.norm(h), t_mod[0], t_mod[1])  # modulate(norm(h))
    if kind == "attention":
        y = attention_by_hand(layer.mixer, x, *context_kv_by_hand(model, seq))
    elif kind == "mamba":
        y, _, _ = layer.mixer(x[None], state.conv[0][b : b + 1], state.ssm[0][b : b + 1], None, "sequential")
        y = y[0]
    else:
        y = layer.mixer(x)
    h = h + (y if t_mod is None else t_mod[2] * y)
    return model.lm_head(den.norm_f(h)).float()


@pytest.mark.parametrize("pattern", ["*", "M", "E", "-"])
@pytest.mark.parametrize("timed", [True, False])
def test_one_layer_denoiser_by_hand(pattern, timed):
    model = random_model(tiny_cfg(hybrid_override_pattern=pattern), seed=21)
    kind = model.config.layer_kinds[0]
    V = model.config.vocab_size
    seqs = [rand_ids((n,), V, seed=22 + n) for n in (7, 3)]  # ragged contexts
    state = prefill(model, seqs)
    blk = rand_ids((2, 5), V, seed=23)
    t = torch.tensor([1.0, 0.4]) if timed else None
    with torch.no_grad():
        got = model.denoise(blk, state, t, scan="sequential")
        mods = model.modulation(t)[:, 0] if timed else [None, None]  # (B, 3, H)
        for b in range(2):
            want = one_layer_by_hand(model, kind, blk, state, b, mods[b], seqs[b])
            torch.testing.assert_close(got[b], want, **TOL)
            if timed:  # the test tells the two adaLN orders apart
                other = "mlp" if kind in ("mamba", "attention") else "mamba"
                swapped = one_layer_by_hand(model, kind, blk, state, b, mods[b], seqs[b], order=other)
                assert not torch.allclose(got[b], swapped, atol=1e-3)


def test_modulation_by_hand():
    """adaLN-single: t*1000 -> [cos | sin] (256, max period 1e4) -> Linear SiLU Linear -> SiLU Linear
    -> (3, H) + scale_shift_tables[i]."""
    model = random_model(seed=24)
    H = model.config.hidden_size
    t = torch.tensor([1.0, 0.25, 0.0])
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128) / 128)
    args = 1000.0 * t[:, None] * freqs
    feats = torch.cat([torch.cos(args), torch.sin(args)], -1)  # (B, 256)
    mlp = model.t_embedder.mlp
    temb = F.linear(F.silu(F.linear(feats, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
    tb = F.linear(F.silu(temb), model.t_block[1].weight, model.t_block[1].bias).view(-1, 3, H)
    with torch.no_grad():
        mod = model.modulation(t)
        assert mod.shape == (3, model.config.num_hidden_layers, 3, H)
        for i, table in enumerate(model.scale_shift_tables):
            torch.testing.assert_close(mod[:, i], tb + table, **TOL)


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_row_output_independent_of_other_rows_contexts(scan):
    model = random_model(seed=25)  # every layer kind
    V = model.config.vocab_size
    seqs = [rand_ids((n,), V, seed=26 + n) for n in (3, 10, 6)]
    blk = rand_ids((3, 4), V, seed=27)
    t = torch.tensor([1.0, 0.5, 0.25])
    with torch.no_grad():
        batch = model.denoise(blk, prefill(model, seqs), t, scan)
        for b, s in enumerate(seqs):
            alone = model.denoise(blk[b : b + 1], prefill(model, [s]), t[b : b + 1], scan)
            torch.testing.assert_close(batch[b], alone[0], **TOL)


def copy_context_into_denoiser(model):
    with torch.no_grad():
        model.denoiser_tower.load_state_dict(model.context_tower.state_dict())
        model.lm_head.weight.copy_(model.context_lm_head.weight)


def test_unmodulated_denoiser_of_one_token_is_the_causal_tower():
    """Mock-AR's step: with the context weights and mod=None, the denoiser reading token L over the
    state of tokens [0, L) gives the context tower's logits at position L."""
    model = random_model(seed=28)
    copy_context_into_denoiser(model)
    V = model.config.vocab_size
    seqs = [rand_ids((n + 1,), V, seed=29 + n) for n in (4, 9)]
    with torch.no_grad():
        state = prefill(model, [s[:-1] for s in seqs])
        got = model.denoise(torch.stack([s[-1:] for s in seqs]).view(2, 1), state, None)
        for b, s in enumerate(seqs):
            torch.testing.assert_close(got[b, 0], model.context_logits(s[None])[0, -1], **TOL)


def test_unmodulated_denoiser_without_attention_is_the_causal_tower_over_a_block():
    """Without attention layers nothing in the denoiser is bidirectional, so a whole block matches."""
    model = random_model(tiny_cfg(hybrid_override_pattern="M-EM"), seed=30)
    copy_context_into_denoiser(model)
    seq = rand_ids((1, 12), model.config.vocab_size, seed=31)
    with torch.no_grad():
        state = model.new_state(1)
        model.context_extend(seq[:, :7], state)
        got = model.denoise(seq[:, 7:], state, None)
        torch.testing.assert_close(got, model.context_logits(seq)[:, 7:], **TOL)
