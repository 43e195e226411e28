"""Mamba-2 scans: chunked (SSD) == sequential recurrence with a seeded state; ragged rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import random_model, tiny_cfg

from twotower_cli.model.twotower import Mamba2, causal_conv, ssd_block, ssd_chunked
from twotower_kernels.ssd import ssd_ref


def scan_inputs(B=2, n=16, nh=4, P=8, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, nh, P, generator=g)
    dt = F.softplus(torch.randn(B, n, nh, generator=g) - 1.0)  # (B, n, nh) > 0
    A = -torch.exp(0.5 * torch.randn(nh, generator=g))  # (nh,) < 0
    Bm = torch.randn(B, n, nh, N, generator=g)
    Cm = torch.randn(B, n, nh, N, generator=g)
    state = torch.randn(B, nh, P, N, generator=g)  # a seeded (nonzero) initial state
    return x, dt, A, Bm, Cm, state


def test_sequential_is_the_recurrence():
    """ssd_ref (the token-by-token recurrence) against the SPEC §2 formula written out for one row, one head."""
    x, dt, A, Bm, Cm, state = scan_inputs(B=1, n=5, nh=1, P=3, N=2, seed=1)
    y, final = ssd_ref(x, dt, A, Bm, Cm, state)
    s = state[0, 0].clone()  # (P, N)
    for i in range(5):
        s = torch.exp(dt[0, i, 0] * A[0]) * s + dt[0, i, 0] * torch.outer(x[0, i, 0], Bm[0, i, 0])
        torch.testing.assert_close(y[0, i, 0], s @ Cm[0, i, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(final[0, 0], s, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [16, 128, 5, 1])
def test_chunked_equals_sequential_seeded_block(chunk):
    """The denoiser's case: a 16-token block continuing from a context state, any chunk size."""
    x, dt, A, Bm, Cm, state = scan_inputs(n=16)
    y_ref, s_ref = ssd_ref(x, dt, A, Bm, Cm, state)
    y, s = ssd_chunked(x, dt, A, Bm, Cm, state, chunk)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


def test_chunked_equals_sequential_long_sequence():
    x, dt, A, Bm, Cm, state = scan_inputs(n=37, seed=2)
    y_ref, s_ref = ssd_ref(x, dt, A, Bm, Cm, state)
    y, s = ssd_chunked(x, dt, A, Bm, Cm, state, 8)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", ["sequential", "chunked"])
def test_dt_zero_positions_leave_state_unchanged(scan):
    x, dt, A, Bm, Cm, state = scan_inputs(n=16, seed=3)
    valid = 11
    dt_pad = dt.clone()
    dt_pad[:, valid:] = 0.0
    run = (lambda *a: ssd_ref(*a)) if scan == "sequential" else (lambda *a: ssd_chunked(*a, 4))
    y_pad, s_pad = run(x, dt_pad, A, Bm, Cm, state)
    y, s = ssd_ref(x[:, :valid], dt[:, :valid], A, Bm[:, :valid], Cm[:, :valid], state)
    torch.testing.assert_close(s_pad, s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_pad[:, :valid], y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", ["sequential", "chunked"])
def test_mamba_ragged_rows_equal_rows_alone(scan):
    """Right-padded rows with n_valid give each row's output and states as if it ran alone,
    including a row with no new token (its states come back unchanged)."""
    cfg = tiny_cfg()
    mixer = random_model(cfg, seed=7, ar_only=True).context_tower.layers[0].mixer
    g = torch.Generator().manual_seed(8)
    n_valid = torch.tensor([9, 3, 0, 6])
    Bsz, n = len(n_valid), int(n_valid.max())
    h = torch.randn(Bsz, n, cfg.hidden_size, generator=g)  # padded positions hold garbage
    conv = torch.randn(Bsz, cfg.conv_dim, cfg.conv_kernel - 1, generator=g)
    ssm = torch.randn(Bsz, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, generator=g)
    with torch.no_grad():
        out, conv2, ssm2 = mixer(h, conv, ssm, n_valid, scan)
        for b, nb in enumerate(n_valid.tolist()):
            if nb == 0:
                torch.testing.assert_close(conv2[b], conv[b], atol=0, rtol=0)
                torch.testing.assert_close(ssm2[b], ssm[b], atol=0, rtol=0)
                continue
            o1, c1, s1 = mixer(h[b : b + 1, :nb], conv[b : b + 1], ssm[b : b + 1], None, scan)
            torch.testing.assert_close(out[b, :nb], o1[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(conv2[b], c1[0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ssm2[b], s1[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("n", [2, 5, 16])
def test_block_scan_equals_sequential(G, n):
    """ssd_block (one chunk, B/C per group) == the recurrence with B/C expanded to heads."""
    x, dt, A, _, _, state = scan_inputs(n=n, seed=11)
    g = torch.Generator().manual_seed(12)
    Bg, Cg = torch.randn(2, n, G, 6, generator=g), torch.randn(2, n, G, 6, generator=g)
    rep = x.shape[2] // G
    y_ref, s_ref = ssd_ref(x, dt, A, Bg.repeat_interleave(rep, 2), Cg.repeat_interleave(rep, 2), state)
    y, s = ssd_block(x, dt, A, Bg, Cg, state)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


def test_block_scan_dt_zero_positions_leave_state_unchanged():
    x, dt, A, Bm, Cm, state = scan_inputs(n=16, seed=13)
    Bg, Cg = Bm[:, :, :1], Cm[:, :, :1]  # one group
    dt_pad = dt.clone()
    dt_pad[:, 11:] = 0.0
    y_pad, s_pad = ssd_block(x, dt_pad, A, Bg, Cg, state)
    y, s = ssd_block(x[:, :11], dt[:, :11], A, Bg[:, :11], Cg[:, :11], state)
    torch.testing.assert_close(s_pad, s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_pad[:, :11], y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 10, 40])  # 3 rows: 3 and 30 tokens unfold, 120 conv1d
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_equals_conv1d(n, bias):
    """Both paths of causal_conv (unfold for short inputs, conv1d past CONV_UNFOLD_MAX)."""
    g = torch.Generator().manual_seed(14)
    C, K = 12, 4
    full = torch.randn(3, C, K - 1 + n, generator=g)
    w = torch.randn(C, 1, K, generator=g)
    b = torch.randn(C, generator=g) if bias else None
    torch.testing.assert_close(causal_conv(full, w, b), F.conv1d(full, w, b, groups=C), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("n", [1, 7, 16])
@pytest.mark.parametrize("fast", [True, False], ids=["block+unfold", "chunked+conv1d"])
def test_mamba_module_fast_paths_equal_sequential(n, fast, groups, monkeypatch):
    """The mixer with the short-input paths on (ssd_block, unfold conv) and off (ssd_chunked,
    conv1d) == the sequential recurrence, for an AR step, a ragged length and a block."""
    monkeypatch.setattr(Mamba2, "BLOCK_SCAN", fast)
    monkeypatch.setattr(Mamba2, "CONV_UNFOLD_MAX", 32 if fast else 0)
    monkeypatch.setattr(Mamba2, "SEQUENTIAL_MAX", 1 if fast else 0)
    cfg = tiny_cfg(n_groups=groups)
    mixer = random_model(cfg, seed=15, ar_only=True).context_tower.layers[0].mixer
    g = torch.Generator().manual_seed(16)
    h = torch.randn(2, n, cfg.hidden_size, generator=g)
    conv = torch.randn(2, cfg.conv_dim, cfg.conv_kernel - 1, generator=g)
    ssm = torch.randn(2, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, generator=g)
    with torch.no_grad():
        a = mixer(h, conv, ssm, None, "sequential")
        b = mixer(h, conv, ssm, None, "chunked")
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
