"""Both TwoTower towers in one file (SPEC.md §2-3).

Glossary (shapes are written where tensors are):
  B  rows in a call                 S  block size (denoiser tokens per block)
  n  new tokens in a context call   L  context length (committed tokens) / cache capacity
  V  vocab                          H  hidden size
  Hq / Hkv / D   attention query heads, key-value heads, head dim
  nh / P / G / N mamba heads, head dim, groups, state size;  C = conv_dim, K = conv kernel

The context tower is a plain causal NemotronH. It keeps, per row, a `TowerState`: attention K/V
(right-aligned rows: row b's keys live at positions [0, lengths[b]); positions after that are
garbage and always masked), and per Mamba layer the conv window (last K-1 inputs) and the fp32 SSM
state. No positional encoding (NoPE), so a key's slot index carries no meaning beyond masking.

Ragged calls: every context call takes `n_valid` (B,), the number of real tokens of each row in a
right-padded (B, n) batch. Padded positions write K/V beyond the row's new length (masked, later
overwritten), leave the SSM state unchanged (dt is forced to 0 there: decay exp(0)=1, input 0),
and the conv window is gathered at each row's own end. So prefill is simply an extension of an
empty state, and rows of different lengths share one forward.

The denoiser tower refines a block of S tokens: layer i attends to [context K/V of layer i ;
block K/V] with no causal mask, and its Mamba layers scan the block starting from the context
tower's layer-i conv window and SSM state. Timestep conditioning is adaLN-single.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twotower_kernels as kernels
from twotower_kernels.ssd import ssd_ref

from ..config import ModelConfig

# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size or dim

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        dtype = x.dtype
        x = x.float()
        if gate is not None:  # Mamba's gated norm: norm(y * silu(z)), computed per group
            x = x * F.silu(gate.float())
        shape = x.shape
        x = x.view(*shape[:-1], -1, self.group_size)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x.view(shape)).to(dtype)


def relu2(x: Tensor) -> Tensor:
    return F.relu(x).square()


class MLP(nn.Module):
    """Ungated relu² MLP: down(relu(up(x))²). Also each MoE expert and the shared expert."""

    def __init__(self, hidden: int, inner: int, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(relu2(self.up_proj(x)))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.mlp_bias) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = MLP(
            cfg.hidden_size, cfg.moe_shared_expert_intermediate_size * cfg.n_shared_experts, cfg.mlp_bias
        )

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k experts per token. x: (T, H) -> (idx (T, k), weights (T, k) fp32)."""
        cfg = self.cfg
        # The router runs in fp64 like the release: the choice is a discrete decision, keep it exact.
        scores = torch.sigmoid(x.double() @ self.gate.weight.double().t())  # (T, E)
        choice = scores + self.gate.e_score_correction_bias.double()
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # (T, k)
        w = scores.gather(1, idx)  # weights from the raw scores, without the correction bias
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, (w * cfg.routed_scaling_factor).float()

    # Up to this many tokens, every expert runs on every token (`_dense`: 2 matmuls for the whole
    # layer, unselected experts weighted 0) instead of a loop over experts: for a denoiser block or
    # an AR step the loop's per-expert overhead costs more than the E/k times larger matmuls
    # (1 thread, tiny model: 66 vs 110 us at 1 token, 190 vs 239 at 16, even at 32, loses at 64).
    # 0 turns it off.
    DENSE_MAX_TOKENS = 32
    # ... and only for layers of at most this many routed experts: the all-expert compute and the
    # cached side-by-side copy of every expert's weights pay off for a handful of experts, not for
    # the release's 128 (top-6: 21x the FLOPs, and a second copy of each MoE layer in memory).
    DENSE_MAX_EXPERTS = 8

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, H)
        idx, w = self.route(x)
        if x.shape[0] <= self.DENSE_MAX_TOKENS and len(self.experts) <= self.DENSE_MAX_EXPERTS:
            return self._dense(x, idx, w).view(shape)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        # Loop over the experts that received tokens; each expert sees its tokens in one matmul.
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tok = order // idx.shape[1]
        wsorted = w.flatten()[order]
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            t = tok[start : start + c]
            y = self.experts[e](x[t]).float() * wsorted[start : start + c, None]
            out.index_add_(0, t, y)
            start += c
        out = out.to(x.dtype) + self.shared_experts(x)
        return out.view(shape)

    def _fused(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Every expert side by side, the shared expert last: up (H, E*I + Is), down (E*I + Is, H),
        up bias (E*I + Is,) or None, down biases (E + 1, H) or None.

        Outside autograd this is cached (it copies every expert's weights: for a 16-token block
        that copy costs as much as the matmuls) and rebuilt when any weight is replaced or modified
        in place (storage pointer or version counter changes)."""
        mlps = [*self.experts, self.shared_experts]
        # The key reads the module dicts directly: 30 nn.Module.__getattr__ lookups per call would
        # cost ~20 us, as much as the layer's matmuls for one token.
        lins = [m._modules[n] for m in mlps for n in ("up_proj", "down_proj")]
        ps = [p for lin in lins for p in lin._parameters.values() if p is not None]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in ps)
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in ps)
        if not grad and getattr(self, "_fused_key", None) == key:
            return self._fused_w
        up = torch.cat([m.up_proj.weight for m in mlps]).t()
        down = torch.cat([m.down_proj.weight for m in mlps], dim=1).t()
        ub = db = None
        if mlps[0].up_proj.bias is not None:
            ub = torch.cat([m.up_proj.bias for m in mlps])
        if mlps[0].down_proj.bias is not None:
            db = torch.stack([m.down_proj.bias for m in mlps])
        fused = (up.contiguous(), down.contiguous(), ub, db)
        if not grad:
            self._fused_key, self._fused_w = key, fused
        return fused

    def _dense(self, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        """The whole layer (T, H) for a few tokens, every expert computed on every token.

        All experts and the shared one sit side by side in one up and one down projection; each
        token's hidden units of expert e are scaled by its weight for e (0 if not chosen; the
        shared expert's by 1), so the down projection sums the chosen experts and the shared one:
        two matmuls for the whole layer."""
        T, E = x.shape[0], len(self.experts)
        gates = torch.zeros(T, E + 1, dtype=torch.float32, device=x.device)
        gates.scatter_(1, idx, w)  # (T, E + 1): the top-k weights, 0 elsewhere ...
        gates[:, E] = 1.0  # ... and the shared expert
        up, down, ub, db = self._fused()
        hid = relu2(x @ up if ub is None else torch.addmm(ub, x, up))  # (T, E*I + Is)
        EI = E * self.experts[0].up_proj.weight.shape[0]
        hid[:, :EI].view(T, E, -1).mul_(gates[:, :E, None].to(hid.dtype))  # the shared units keep 1
        y = hid @ down
        return y if db is None else y + (gates @ db.float()).to(y.dtype)


# ------------------------------------------------------------------------------------------------
# Mamba-2 scans (fp32). Each accepts a seeded initial state and returns (y, final_state); their
# twin is the token-by-token recurrence `twotower_kernels.ssd.ssd_ref`.
# ------------------------------------------------------------------------------------------------


def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """The same recurrence in the chunked (SSD) form: quadratic inside a chunk, recurrent across.

    Shapes as in `ssd_ref`. Padding to a multiple of `chunk` uses dt = 0 (identity steps).
    """
    Bsz, n, nh, P = x.shape
    pad = (-n) % chunk
    if pad:
        x, Bm, Cm = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, Bm, Cm))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = x.shape[1] // chunk
    x, Bm, Cm = (t.reshape(Bsz, c, chunk, nh, -1) for t in (x, Bm, Cm))  # (B, c, Q, nh, *)
    dt = dt.reshape(Bsz, c, chunk, nh)
    a = torch.cumsum(dt * A, dim=2)  # (B, c, Q, nh) cumulative log-decay inside each chunk
    # decay from s to l (s <= l): exp(a_l - a_s); masked before exp so nothing overflows.
    seg = a.permute(0, 1, 3, 2)[..., :, None] - a.permute(0, 1, 3, 2)[..., None, :]  # (B, c, nh, Q, Q)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    Lmat = torch.exp(seg.masked_fill(~causal, float("-inf")))
    xdt = x * dt[..., None]  # (B, c, Q, nh, P)
    CB = torch.einsum("bclhn,bcshn->bchls", Cm, Bm)
    y = torch.einsum("bchls,bcshp->bclhp", CB * Lmat, xdt)
    # state contributed by each chunk, measured at the chunk's end
    decay_to_end = torch.exp(a[:, :, -1:, :] - a)  # (B, c, Q, nh)
    chunk_states = torch.einsum("bclhn,bclh,bclhp->bchpn", Bm, decay_to_end, xdt)
    chunk_decay = torch.exp(a[:, :, -1, :])  # (B, c, nh)
    entering = []
    for k in range(c):
        entering.append(state)
        state = state * chunk_decay[:, k, :, None, None] + chunk_states[:, k]
    entering = torch.stack(entering, 1)  # (B, c, nh, P, N)
    y = y + torch.einsum("bclhn,bchpn,bclh->bclhp", Cm, entering, torch.exp(a))
    y = y.reshape(Bsz, c * chunk, nh, P)[:, :n]
    return y, state


def ssd_block(x: Tensor, dt: Tensor, A: Tensor, Bg: Tensor, Cg: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence for one short block in a single chunk, written as batched matmuls.

    Why: a denoiser step or a block commit scans S = 16 tokens. `ssd_chunked` pays for the general
    multi-chunk form (padding, per-chunk states, a loop, four einsums over heads); one chunk needs
    none of it, and B/C stay per group (`Bg`/`Cg` (B, n, G, N), not expanded to heads), so C·Bᵀ is
    computed once per group. Other shapes as in `ssd_ref`, which is its twin in the tests.
    """
    Bsz, n, nh, P = x.shape
    G = Bg.shape[2]
    rep = nh // G
    a = torch.cumsum(dt * A, dim=1).transpose(1, 2)  # (B, nh, n) cumulative log-decay
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    Lmat = torch.exp((a[..., :, None] - a[..., None, :]).masked_fill(~causal, float("-inf")))  # (B, nh, l, s)
    Cg, Bg = Cg.transpose(1, 2), Bg.transpose(1, 2)  # (B, G, n, N)
    CB = Cg @ Bg.transpose(2, 3)  # (B, G, l, s)
    M = (Lmat.view(Bsz, G, rep, n, n) * CB[:, :, None]).view(Bsz, nh, n, n)
    xdt = (x * dt[..., None]).transpose(1, 2)  # (B, nh, n, P)
    Ch = Cg[:, :, None].expand(Bsz, G, rep, n, -1).reshape(Bsz, nh, n, -1)  # (B, nh, n, N)
    Bh = Bg[:, :, None].expand(Bsz, G, rep, n, -1).reshape(Bsz, nh, n, -1)
    y = M @ xdt + (Ch @ state.transpose(2, 3)) * torch.exp(a)[..., None]  # (B, nh, n, P)
    return y.transpose(1, 2), _block_end_state(state, a, xdt, Bh)


def _block_end_state(state: Tensor, a: Tensor, xdt: Tensor, Bh: Tensor) -> Tensor:
    """The state after a block: a (B, nh, n) cumulative log-decay, xdt (B, nh, n, P), Bh (B, nh, n, N)."""
    to_end = torch.exp(a[..., -1:] - a)[..., None]  # (B, nh, n, 1) decay from each token to the end
    return state * torch.exp(a[..., -1])[..., None, None] + (xdt * to_end).transpose(2, 3) @ Bh


def ssd_state(x: Tensor, dt: Tensor, A: Tensor, Bg: Tensor, state: Tensor) -> Tensor:
    """Only the state after a block (no outputs), B per group as in `ssd_block`. With dt zeroed
    from position m on, it is the state after the first m tokens: how a verify forward of S
    tokens rolls back to the m it keeps without running the tower again."""
    Bsz, n, nh, P = x.shape
    G = Bg.shape[2]
    a = torch.cumsum(dt * A, dim=1).transpose(1, 2)  # (B, nh, n)
    xdt = (x * dt[..., None]).transpose(1, 2)  # (B, nh, n, P)
    Bh = Bg.transpose(1, 2)[:, :, None].expand(Bsz, G, nh // G, n, -1).reshape(Bsz, nh, n, -1)
    return _block_end_state(state, a, xdt, Bh)


def causal_conv(full: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise conv of full (B, C, K-1+n) with weight (C, 1, K): (B, C, n). Calls of at most
    CONV_UNFOLD_MAX tokens (B * n) go through unfold + multiply-sum: oneDNN's depthwise conv costs
    ~5x that for one token on CPU, but unfold materialises B*C*n*K values and loses past ~32."""
    K = weight.shape[-1]
    n = full.shape[2] - K + 1
    if full.shape[0] * n > Mamba2.CONV_UNFOLD_MAX:
        return F.conv1d(full, weight, bias, groups=weight.shape[0])
    y = (full.unfold(2, K, 1) * weight[:, None, 0, :]).sum(-1)  # (B, C, n, K) -> (B, C, n)
    return y if bias is None else y + bias[:, None]


class Mamba2(nn.Module):
    # Blocks up to this length use the token-by-token recurrence whatever `scan` asks: for an AR
    # step (n = 1) it is three ops against the chunked form's dozen. 0 turns it off.
    SEQUENTIAL_MAX = 1
    # Blocks of at most chunk_size tokens use `ssd_block` (one chunk); longer ones `ssd_chunked`.
    BLOCK_SCAN = True
    # Calls of at most this many new tokens (rows x tokens) take `causal_conv`'s unfold path.
    CONV_UNFOLD_MAX = 32

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, C = cfg.hidden_size, cfg.conv_dim
        self.in_proj = nn.Linear(H, cfg.d_inner + C + cfg.mamba_num_heads, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(C, C, cfg.conv_kernel, groups=C, bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(cfg.mamba_num_heads))
        self.A_log = nn.Parameter(torch.zeros(cfg.mamba_num_heads))
        self.D = nn.Parameter(torch.ones(cfg.mamba_num_heads))
        self.norm = RMSNorm(cfg.d_inner, cfg.layer_norm_epsilon, group_size=cfg.d_inner // cfg.n_groups)
        self.out_proj = nn.Linear(cfg.d_inner, H, bias=cfg.mamba_proj_bias)

    def forward(
        self,
        h: Tensor,
        conv_state: Tensor,
        ssm_state: Tensor,
        n_valid: Tensor | None = None,
        scan: str = "chunked",
        keep: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """h (B, n, H) continuing from conv_state (B, C, K-1) and ssm_state (B, nh, P, N) fp32.

        Returns (out (B, n, H), new conv_state, new ssm_state). With n_valid, positions at or after
        a row's n_valid[b] are padding: they do not change that row's returned states.
        scan: "chunked" | "sequential" | "auto" (twotower_kernels' block scan for short blocks where
        the dispatch picks Triton, i.e. on CUDA; "chunked" otherwise). Under "chunked"/"auto",
        blocks of at most SEQUENTIAL_MAX tokens take the sequential recurrence and blocks that fit
        one chunk take `ssd_block` (BLOCK_SCAN); "sequential" always means the recurrence.
        keep: filled with what `rollback` needs to return the states after any prefix of the block
        (the conv window, the scan's inputs and the state before the block; no state per token).
        """
        cfg = self.cfg
        Bsz, n, _ = h.shape
        K, nh, P, G, N = cfg.conv_kernel, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
        z, xBC, dt = self.in_proj(h).split([cfg.d_inner, cfg.conv_dim, nh], dim=-1)
        # depthwise causal conv continuing from the saved window
        full = torch.cat([conv_state.to(xBC.dtype), xBC.transpose(1, 2)], dim=2)  # (B, C, K-1+n)
        xBC = F.silu(causal_conv(full, self.conv1d.weight, self.conv1d.bias)).transpose(1, 2)
        if n_valid is None:
            new_conv = full[:, :, n:]
        else:  # each row's window ends at its own last real token
            cols = n_valid[:, None] + torch.arange(K - 1, device=h.device)  # (B, K-1)
            new_conv = full.gather(2, cols[:, None, :].expand(-1, full.shape[1], -1))
        x, Bm, Cm = xBC.split([cfg.d_inner, G * N, G * N], dim=-1)
        x = x.reshape(Bsz, n, nh, P).float()
        rep = nh // G
        Bg = Bm.reshape(Bsz, n, G, N).float()  # (B, n, G, N)
        Cg = Cm.reshape(Bsz, n, G, N).float()
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, n, nh), unclamped like the release
        if n_valid is not None:
            dt = dt * (torch.arange(n, device=h.device)[None, :] < n_valid[:, None])[..., None]
        A = -torch.exp(self.A_log.float())
        if keep is not None:
            keep.update(full=full, x=x, dt=dt, A=A, Bg=Bg, ssm=ssm_state)
        ours = scan in ("chunked", "auto")
        short = ours and n <= self.SEQUENTIAL_MAX
        triton = scan == "auto" and not short and n <= kernels.BLOCK_SCAN_MAX and kernels.backend(x.device) == "triton"
        if ours and not (short or triton) and n <= cfg.chunk_size and self.BLOCK_SCAN:
            y, new_ssm = ssd_block(x, dt, A, Bg, Cg, ssm_state.float())
        else:
            Bm, Cm = Bg.repeat_interleave(rep, dim=2), Cg.repeat_interleave(rep, dim=2)  # (B, n, nh, N)
            if triton:
                y, new_ssm = kernels.block_scan(x, dt, A, Bm, Cm, ssm_state.float())  # short seeded block
            elif scan == "sequential" or short:
                y, new_ssm = ssd_ref(x, dt, A, Bm, Cm, ssm_state.float())
            else:
                y, new_ssm = ssd_chunked(x, dt, A, Bm, Cm, ssm_state.float(), min(cfg.chunk_size, max(n, 1)))
        y = y + x * self.D.float()[:, None]
        y = self.norm(y.reshape(Bsz, n, cfg.d_inner), gate=z)
        return self.out_proj(y.to(h.dtype)), new_conv.to(conv_state.dtype), new_ssm

    @staticmethod
    def rollback(kept: dict[str, Tensor], m: Tensor, conv_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(conv state, ssm state) after the first m[b] tokens (1 <= m <= n) of the block whose
        forward filled `kept`: the window is a slice of the saved one, the SSM state the block's
        scan rerun with dt zeroed from m on (exact: a zero step changes nothing)."""
        full, dt = kept["full"], kept["dt"]
        n, K1 = dt.shape[1], full.shape[2] - dt.shape[1]
        cols = m[:, None] + torch.arange(K1, device=m.device)  # (B, K-1)
        conv = full.gather(2, cols[:, None, :].expand(-1, full.shape[1], -1)).to(conv_dtype)
        live = (torch.arange(n, device=m.device)[None, :] < m[:, None])[..., None]  # (B, n, 1)
        return conv, ssd_state(kept["x"], dt * live, kept["A"], kept["Bg"], kept["ssm"].float())


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, Hq, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(H, Hq * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, Hkv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(Hq * D, H, bias=cfg.attention_bias)

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        Bsz, n, _ = h.shape
        q = self.q_proj(h).view(Bsz, n, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)  # (B, Hq, n, D)
        k = self.k_proj(h).view(Bsz, n, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, n, D)
        v = self.v_proj(h).view(Bsz, n, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q (B, Hq, n, D), k/v (B, Hkv, Lk, D), mask (B, 1, n, Lk) bool (True = may attend) or
        None (every query attends to every key)."""
        rep = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)  # (B, Hq, n, D)
        Bsz, _, n, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(Bsz, n, -1))


# ------------------------------------------------------------------------------------------------
# Context state
# ------------------------------------------------------------------------------------------------


@dataclass
class TowerState:
    """Per-row context-tower state. Attention layers own k/v, Mamba layers own conv/ssm.

    k[i], v[i]: (B, Hkv, L, D) with row b valid on [0, lengths[b]); conv[i]: (B, C, K-1);
    ssm[i]: (B, nh, P, N) fp32; lengths: (B,) int64 = tokens the context tower has read.
    """

    lengths: Tensor
    k: dict[int, Tensor] = field(default_factory=dict)
    v: dict[int, Tensor] = field(default_factory=dict)
    conv: dict[int, Tensor] = field(default_factory=dict)
    ssm: dict[int, Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return next(iter(self.k.values())).shape[2] if self.k else 1 << 62

    def ensure_capacity(self, need: int) -> None:
        """Grow the K/V buffers (amortised doubling) so that `need` positions fit."""
        cap = self.capacity
        if not self.k or need <= cap:
            return
        new = max(need, 2 * cap, 16)
        for d in (self.k, self.v):
            for i, t in d.items():
                d[i] = torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], new - cap, t.shape[3])], dim=2)

    def tensors(self) -> list[dict[int, Tensor]]:
        return [self.k, self.v, self.conv, self.ssm]

    def select(self, rows: Tensor) -> TowerState:
        """A new state holding only `rows` (a copy)."""
        out = TowerState(self.lengths[rows])
        for src, dst in zip(self.tensors(), out.tensors()):
            for i, t in src.items():
                dst[i] = t[rows]
        return out

    def assign(self, rows: Tensor, other: TowerState) -> None:
        """Write `other` (holding len(rows) rows) into rows `rows` of this state, in place."""
        self.ensure_capacity(other.capacity if other.k else 0)
        self.lengths[rows] = other.lengths
        for j, (dst, src) in enumerate(zip(self.tensors(), other.tensors())):
            for i, t in src.items():
                if i not in dst:  # a layer this state has not allocated yet
                    shape = (self.batch, *t.shape[1:])
                    dst[i] = t.new_zeros((shape[0], shape[1], max(shape[2], 16), shape[3]) if j < 2 else shape)
                if j < 2:  # K/V: the other state's capacity may be smaller than ours
                    dst[i][rows, :, : t.shape[2]] = t
                else:
                    dst[i][rows] = t

    @staticmethod
    def concat(states: list[TowerState]) -> TowerState:
        """Stack rows of several states (K/V padded to the longest capacity)."""
        cap = max(s.capacity for s in states) if states[0].k else 0
        out = TowerState(torch.cat([s.lengths for s in states]))
        for j, dst in enumerate(out.tensors()):
            for i in states[0].tensors()[j]:
                parts = [s.tensors()[j][i] for s in states]
                if j < 2:
                    parts = [F.pad(t, (0, 0, 0, cap - t.shape[2])) for t in parts]
                dst[i] = torch.cat(parts)
        return out


# ------------------------------------------------------------------------------------------------
# Towers
# ------------------------------------------------------------------------------------------------


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        if kind == "mamba":
            self.mixer = Mamba2(cfg)
        elif kind == "attention":
            self.mixer = Attention(cfg)
        elif kind == "moe":
            self.mixer = MoE(cfg)
        else:
            self.mixer = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)


class Tower(nn.Module):
    """One NemotronH backbone (embeddings -> layers -> norm_f). Heads live on `TwoTower`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, k) for k in cfg.layer_kinds)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    # -- the context tower: causal, reads into the state ----------------------------------------
    def extend(self, ids: Tensor, state: TowerState, n_valid: Tensor | None = None, scan: str = "chunked",
               keep: dict[int, dict[str, Tensor]] | None = None) -> Tensor:
        """Read `ids` (B, n) (row b: its first n_valid[b]) after what `state` holds; update `state`.
        keep: filled per Mamba layer with what `rollback` needs (see `Mamba2.forward`).

        Returns the final hidden states (B, n, H) after norm_f.
        """
        Bsz, n = ids.shape
        dev = ids.device
        ragged = n_valid is not None
        if n_valid is None:
            n_valid = torch.full((Bsz,), n, dtype=torch.long, device=dev)
        start = state.lengths  # (B,)
        Lk = int(start.max()) + n if Bsz else n
        state.ensure_capacity(Lk)
        pos = start[:, None] + torch.arange(n, device=dev)  # (B, n) absolute slot of each new token
        # query j of row b sees key slot p iff p <= start_b + j (older keys and causal among new);
        # one new token in rows of one length (an AR step at batch 1) sees every slot: no mask
        mask = None
        if n > 1 or (Bsz and int(start.min()) + n != Lk):
            mask = (torch.arange(Lk, device=dev)[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, n, Lk)
        rows = torch.arange(Bsz, device=dev)[:, None]
        h = self.embeddings(ids)
        for i, layer in enumerate(self.layers):
            x = layer.norm(h)
            if layer.kind == "mamba":
                y, state.conv[i], state.ssm[i] = layer.mixer(
                    x, state.conv[i], state.ssm[i], n_valid if ragged else None, scan,
                    None if keep is None else keep.setdefault(i, {}),
                )
            elif layer.kind == "attention":
                q, k, v = layer.mixer.qkv(x)
                if i not in state.k:
                    kk = k.new_zeros(Bsz, k.shape[1], Lk, k.shape[3])
                    state.k[i], state.v[i] = kk, kk.clone()
                K, Vv = state.k[i], state.v[i]
                K[rows, :, pos] = k.transpose(1, 2).to(K.dtype)  # (B, n, Hkv, D) into slots
                Vv[rows, :, pos] = v.transpose(1, 2).to(Vv.dtype)
                y = layer.mixer.attend(q, K[:, :, :Lk], Vv[:, :, :Lk], mask)
            else:
                y = layer.mixer(x)
            h = h + y
        state.lengths = start + n_valid
        return self.norm_f(h)

    def rollback(self, state: TowerState, kept: dict[int, dict[str, Tensor]], start: Tensor, m: Tensor) -> None:
        """Undo all but the first m[b] tokens of the last `extend` (which filled `kept`, from
        lengths `start`): attention needs only the length (K/V past it are masked and later
        overwritten), each Mamba layer its state at m (`Mamba2.rollback`). No forward runs."""
        for i, k in kept.items():
            state.conv[i], state.ssm[i] = Mamba2.rollback(k, m, state.conv[i].dtype)
        state.lengths = start + m

    # -- the denoiser tower: a block over the context state, optionally time-modulated ----------
    def denoise(self, ids: Tensor, state: TowerState, mod: Tensor | None, scan: str = "chunked") -> Tensor:
        """ids (B, S) read over `state` (not modified); mod (B, n_layers, 3, H) or None.

        Returns hidden states (B, S, H) after norm_f.
        """
        Bsz, S = ids.shape
        dev = ids.device
        Lc = int(state.lengths.max()) if Bsz else 0
        mask = None  # every row's context is [0, Lc): nothing to mask (always so at batch 1)
        if Bsz and int(state.lengths.min()) != Lc:
            ctx_ok = torch.arange(Lc, device=dev)[None, :] < state.lengths[:, None]  # (B, Lc)
            mask = torch.cat([ctx_ok, ctx_ok.new_ones(Bsz, S)], dim=1)[:, None, None, :]  # (B, 1, 1, Lc+S)
        if mod is not None:  # per layer (B, 1, H) views, 1 + scale computed once for all layers
            shifts, gates = mod[:, :, 0, None].unbind(1), mod[:, :, 2, None].unbind(1)
            scales = (1 + mod[:, :, 1, None]).unbind(1)
        h = self.embeddings(ids)
        for i, layer in enumerate(self.layers):
            if mod is None:
                x = layer.norm(h)
            elif layer.kind in ("mamba", "attention"):
                x = layer.norm(torch.addcmul(shifts[i], h, scales[i]))  # norm(h * (1 + scale) + shift)
            else:
                x = torch.addcmul(shifts[i], layer.norm(h), scales[i])  # norm(h) * (1 + scale) + shift
            if layer.kind == "mamba":
                y, _, _ = layer.mixer(x, state.conv[i], state.ssm[i], None, scan)
            elif layer.kind == "attention":
                q, k, v = layer.mixer.qkv(x)
                K = torch.cat([state.k[i][:, :, :Lc].to(k.dtype), k], dim=2)
                Vv = torch.cat([state.v[i][:, :, :Lc].to(v.dtype), v], dim=2)
                y = layer.mixer.attend(q, K, Vv, mask)
            else:
                y = layer.mixer(x)
            h = h + y if mod is None else torch.addcmul(h, gates[i], y)
        return self.norm_f(h)


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of t*1000, [cos | sin] (adaLN-single / PixArt-α). t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TwoTower(nn.Module):
    """The context tower, the denoiser tower, their heads and the adaLN-single.

    `ar_only=True` builds the context tower alone (a plain NemotronH checkpoint).
    """

    def __init__(self, cfg: ModelConfig, ar_only: bool = False, seed: int | None = 0, init: bool = True):
        super().__init__()
        self.config = cfg
        H = cfg.hidden_size
        self.context_tower = Tower(cfg)
        self.context_lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
        self.ar_only = ar_only
        if not ar_only:
            self.denoiser_tower = Tower(cfg)
            self.lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
            self.t_embedder = nn.Module()
            self.t_embedder.mlp = nn.Sequential(nn.Linear(256, H), nn.SiLU(), nn.Linear(H, H))
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(H, 3 * H))
            self.scale_shift_tables = nn.ParameterList(
                nn.Parameter(torch.zeros(3, H)) for _ in range(cfg.num_hidden_layers)
            )
        if init:
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int | None = 0) -> None:
        g = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        cfg = self.config
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "scale_shift_tables" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(cfg.hidden_size))
            elif leaf == "A_log":
                p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)))
            elif leaf == "dt_bias":  # inverse softplus of dt in [1e-3, 1e-1], log-uniform
                dt = torch.exp(torch.rand(p.shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif leaf == "D" or name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.fill_(1.0)
            elif leaf == "bias" or leaf == "e_score_correction_bias":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)

    # -- state --------------------------------------------------------------------------------
    def new_state(self, batch: int, capacity: int = 0, device: torch.device | str | None = None) -> TowerState:
        """An empty context state for `batch` rows (nothing read yet)."""
        cfg = self.config
        p = self.context_lm_head.weight
        device = device or p.device
        st = TowerState(torch.zeros(batch, dtype=torch.long, device=device))
        for i, kind in enumerate(cfg.layer_kinds):
            if kind == "mamba":
                st.conv[i] = torch.zeros(batch, cfg.conv_dim, cfg.conv_kernel - 1, dtype=p.dtype, device=device)
                st.ssm[i] = torch.zeros(
                    batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, device=device
                )
            elif kind == "attention" and capacity:
                shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
                st.k[i] = torch.zeros(shape, dtype=p.dtype, device=device)
                st.v[i] = torch.zeros(shape, dtype=p.dtype, device=device)
        return st

    # -- the two towers' entry points -----------------------------------------------------------
    def context_extend(
        self, ids: Tensor, state: TowerState, n_valid: Tensor | None = None, logits: bool | str = False,
        scan: str = "chunked", keep: dict[int, dict[str, Tensor]] | None = None,
    ) -> Tensor | None:
        """The context tower reads ids (B, n) into `state`. With logits=True returns the
        context head's logits (B, V) fp32 at each row's last real token; with logits="all" at every
        position (B, n, V). keep: see `Tower.extend` (for `context_rollback`)."""
        dev = self.context_tower.embeddings.weight.device
        h = self.context_tower.extend(ids.to(dev), state, None if n_valid is None else n_valid.to(dev), scan, keep)
        if not logits:
            return None
        if logits == "all":
            return self.context_lm_head(h).float()
        if n_valid is None:
            last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=dev)
        else:
            last = n_valid.to(dev) - 1
        hl = h[torch.arange(h.shape[0], device=dev), last]  # (B, H)
        return self.context_lm_head(hl).float()

    def prefill(self, prompts: Sequence[Sequence[int]], logits: bool = False,
                scan: str = "chunked") -> tuple[TowerState, Tensor | None]:
        """The context tower reads ragged prompts (right-padded into one forward) into a new state.
        A prompt may be empty (nothing read). With logits=True also returns the context head's
        logits (B, V) at each row's last token."""
        lens = [len(p) for p in prompts]
        ids = torch.zeros(len(prompts), max(max(lens, default=0), 1), dtype=torch.long)  # (B, n)
        for b, p in enumerate(prompts):
            ids[b, : lens[b]] = torch.tensor(list(p), dtype=torch.long)
        dev = self.context_lm_head.weight.device
        state = self.new_state(len(prompts))
        out = self.context_extend(ids.to(dev), state, n_valid=torch.tensor(lens, device=dev), logits=logits, scan=scan)
        return state, out

    def context_rollback(self, state: TowerState, kept: dict[int, dict[str, Tensor]], start: Tensor,
                         m: Tensor) -> None:
        """Keep only the first m (B,) tokens of the last `context_extend(..., keep=kept)` (see
        `Tower.rollback`)."""
        self.context_tower.rollback(state, kept, start, m.to(start.device))

    def context_logits(self, ids: Tensor) -> Tensor:
        """Full causal forward from an empty state: logits (B, n, V). For tests and training."""
        st = self.new_state(ids.shape[0], device=ids.device)
        return self.context_lm_head(self.context_tower.extend(ids, st)).float()

    def modulation(self, t: Tensor) -> Tensor:
        """t (B,) -> per-layer (shift, scale, gate): (B, n_layers, 3, H)."""
        p = self.t_block[1].weight
        temb = self.t_embedder.mlp(timestep_features(t.to(p.device)).to(p.dtype))  # (B, H)
        tb = self.t_block(temb).view(-1, 1, 3, self.config.hidden_size)  # (B, 1, 3, H)
        tables = torch.stack(list(self.scale_shift_tables))  # (n_layers, 3, H)
        return tables[None].to(tb.dtype) + tb

    def denoise(self, ids: Tensor, state: TowerState, t: Tensor | None, scan: str = "chunked") -> Tensor:
        """The denoiser reads a block ids (B, S) over the context `state`; t (B,) or None for no
        time conditioning (mock-AR). Returns lm_head logits (B, S, V) fp32."""
        if self.ar_only:
            raise RuntimeError("this checkpoint has no denoiser tower (AR mode only)")
        dev = self.denoiser_tower.embeddings.weight.device
        mod = self.modulation(t.to(dev)) if t is not None else None
        return self.lm_head(self.denoiser_tower.denoise(ids.to(dev), state, mod, scan)).float()

    # -- dtype ----------------------------------------------------------------------------------
    FP32_PARAMS = ("A_log", "D", "dt_bias", "e_score_correction_bias", "gate.weight")

    def cast(self, dtype: torch.dtype) -> TwoTower:
        """Cast weights to `dtype`, keeping the SSM constants and the router in fp32."""
        for name, p in self.named_parameters():
            keep = any(name.endswith(k) for k in self.FP32_PARAMS) and ".mixer." in name
            p.data = p.data.to(torch.float32 if keep else dtype)
        return self
