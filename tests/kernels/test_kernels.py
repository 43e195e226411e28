"""twotower_kernels: every Triton kernel against its `_ref` twin, and the dispatch's choices.

Without CUDA the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set below, before
anything builds a kernel (they are built lazily, on first use, and Triton reads the variable
then), so tiny shapes only. With CUDA the interpreter stays off and the @gpu tests compile them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from model_helpers import random_model, tiny_cfg  # noqa: E402

import twotower_kernels as kernels  # noqa: E402
from twotower_cli.engine.decode import choose  # noqa: E402
from twotower_cli.model.twotower import ssd_chunked  # noqa: E402
from twotower_kernels.confidence import (  # noqa: E402
    confidence_ref,
    gumbel,
    sampling_floor,
)
from twotower_kernels.ssd import ssd_ref  # noqa: E402

gpu = pytest.mark.gpu
_interpreter = pytest.mark.skipif(
    not (kernels.HAS_TRITON and kernels.interpreting()), reason="needs triton and TRITON_INTERPRET=1 (no CUDA)"
)


def needs_interpreter(test):
    """Triton kernels run in the CPU interpreter: slow (outside the `-m "not slow"` loop)."""
    return pytest.mark.slow(_interpreter(test))
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.HAS_TRITON), reason="needs CUDA + triton")

MASK = 3


def row_inputs(B=2, S=4, seed=0, device="cpu"):
    """Per-row sampling inputs: a negative seed and a key above 2^32 exercise the hash's masking."""
    g = torch.Generator().manual_seed(seed)
    seeds = torch.tensor([seed, -7 - seed] * B)[:B]
    keys = torch.randint(0, 2**62, (B,), generator=g)
    steps = torch.randint(0, 8, (B,), generator=g)
    pos = torch.randint(0, 1000, (B, 1), generator=g) + torch.arange(S)
    return tuple(t.to(device) for t in (seeds, keys, pos, steps))


def tied_logits(B=2, S=4, V=67, seed=0, device="cpu"):
    """Integer-valued logits: many exact ties for the max, across tiles too; the mask id holds the
    row maximum at some positions (it must never win)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-4, 3, (B, S, V), generator=g).float()
    logits[0, 0, MASK] = 9.0
    logits[-1, -1, MASK] = 9.0
    logits[0, 1, V - 1] = 2.0  # a tie at the very last (partial-tile) id
    return logits.to(device)


# -- dispatch ---------------------------------------------------------------------------------------


def test_dispatch_auto_and_overrides(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.requested() == "auto"
    assert kernels.backend("cpu") == "ref"  # auto never runs the interpreter on CPU tensors
    with kernels.force("ref"):
        assert kernels.backend("cpu") == "ref"
        assert kernels.backend("cuda") == "ref"
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    assert kernels.backend("cuda") == "triton"  # auto on CUDA (the device type is all it reads)
    monkeypatch.setenv(kernels.ENV, "ref")
    assert kernels.backend("cuda") == "ref"
    with kernels.force("auto"):  # the context manager wins over the environment
        assert kernels.backend("cuda") == "triton"
    monkeypatch.setenv(kernels.ENV, "bogus")
    with pytest.raises(ValueError, match="TWOTOWER_KERNELS"):
        kernels.backend("cpu")
    with pytest.raises(ValueError):
        with kernels.force("cuda"):
            pass


def test_dispatch_without_triton(monkeypatch):
    """Triton absent: auto falls back to the ref everywhere; forcing Triton says why it cannot."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels.dispatch, "HAS_TRITON", False)  # where backend() reads it
    assert kernels.backend("cuda") == "ref"
    assert kernels.backend("cpu") == "ref"
    with kernels.force("triton"), pytest.raises(kernels.KernelUnavailable, match="not installed"):
        kernels.backend("cuda")
    logits = tied_logits()
    with kernels.force("auto"):
        pred, conf = kernels.propose(logits, torch.zeros(2), *row_inputs())
    torch.testing.assert_close(pred, logits.argmax(-1), rtol=0, atol=0)


def test_dispatch_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.force("triton"), pytest.raises(kernels.KernelUnavailable, match="TRITON_INTERPRET"):
        kernels.backend("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.force("triton"):
        assert kernels.backend("cpu") == "triton"


@pytest.mark.slow  # a subprocess
def test_imports_without_extras_and_cpu_default_stays_torch():
    """A fresh interpreter: the CPU default path never imports triton; with triton hidden the
    package still imports, reports HAS_TRITON False and decodes."""
    script = """
import importlib, sys, torch
import twotower_kernels as k
from twotower_cli.engine.decode import choose
from twotower_cli.model.twotower import Mamba2
assert "triton" not in sys.modules and "mamba_ssm" not in sys.modules
logits = torch.randn(2, 3, 11)
args = (torch.tensor([0.0, 1.0]), torch.tensor([1, 2]), torch.tensor([3, 4]), torch.arange(3).expand(2, 3),
        torch.tensor([0, 1]))
choose(logits, *args)
assert k.backend("cpu") == "ref" and "triton" not in sys.modules
sys.modules["triton"] = None  # hide it, as on a machine without the gpu extra
importlib.reload(k.dispatch)
importlib.reload(k)
assert not k.HAS_TRITON and k.backend("cuda") == "ref"
choose(logits, *args)
print("ok")
"""
    env = {key: v for key, v in os.environ.items() if key not in ("TRITON_INTERPRET", kernels.ENV)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# -- confidence -------------------------------------------------------------------------------------


def test_confidence_ref_is_what_choose_computes():
    """The ref with mask_id == decode.choose on logits whose mask id the caller set to -inf, bitwise."""
    logits = tied_logits(V=50) + 0.1 * torch.randn(2, 4, 50, generator=torch.Generator().manual_seed(1))
    for temp in ([0.0, 0.0], [1.0, 0.5], [0.0, 1.5]):
        t = torch.tensor(temp)
        rows = row_inputs(seed=4)
        pred, conf = confidence_ref(logits, t, *rows, mask_id=MASK)
        masked = logits.clone()
        masked[..., MASK] = -float("inf")
        with kernels.force("ref"):
            pred_c, conf_c = choose(masked, t, *rows)
        assert torch.equal(pred, pred_c) and torch.equal(conf, conf_c)
        assert not (pred == MASK).any()


def row_filters(B=2):
    """Per-row (top_k, top_p, min_p), cycling through each filter alone, all three, and none."""
    table = [(4, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (6, 0.8, 0.05), (0, 1.0, 0.0)]
    ks, ps, ms = zip(*(table[b % len(table)] for b in range(B)))
    return torch.tensor(ks), torch.tensor(ps, dtype=torch.float64), torch.tensor(ms)


def filtered_inputs(B=3, S=4, V=67, seed=0):
    """Tied logits plus a little noise, the mask id -inf (as the engine's denoiser step sets it),
    mixed temperatures, and the floor of `row_filters` over those logits."""
    g = torch.Generator().manual_seed(seed + 10)
    logits = tied_logits(B, S, V, seed=seed) + 0.3 * torch.randn(B, S, V, generator=g)
    logits[..., MASK] = -float("inf")
    t = torch.tensor([1.0, 0.7, 0.0, 1.3, 2.0][:B])
    f = row_filters(B)
    return logits, t, f, sampling_floor(logits, t, *f)


def test_confidence_ref_with_floor_is_what_choose_computes_with_filters():
    """decode.choose with per-row filters == the ref given `sampling_floor`'s floor, bitwise; the
    floor changes sampled tokens and nothing else (greedy rows, conf)."""
    logits, t, f, floor = filtered_inputs(B=5)
    rows = row_inputs(B=5, seed=6)
    with kernels.force("ref"):
        pred_c, conf_c = choose(logits, t, *rows, f)
        free = choose(logits, t, *rows)
    pred, conf = confidence_ref(logits, t, *rows, mask_id=MASK, floor=floor)
    assert torch.equal(pred, pred_c) and torch.equal(conf, conf_c)
    assert (logits.gather(-1, pred[..., None])[..., 0] >= floor).all() and not (pred == MASK).any()
    assert not torch.equal(pred, free[0])
    assert torch.equal(pred[2], free[0][2]) and torch.equal(pred[4], free[0][4])  # greedy; no filter
    torch.testing.assert_close(conf, torch.softmax(logits, -1).gather(-1, pred[..., None])[..., 0], rtol=0, atol=0)


@needs_interpreter
@pytest.mark.parametrize("seed", [0, 1])
def test_gumbel_noise_bitwise(seed):
    from twotower_kernels.confidence import gumbel_triton

    seeds, keys, pos, steps = row_inputs(B=3, S=2, seed=seed)
    for V in (67, 300):
        assert torch.equal(gumbel_triton(seeds, keys, pos, steps, V), gumbel(seeds, keys, pos, steps, V))


@needs_interpreter
@pytest.mark.parametrize("block", [None, 16])  # one tile / five tiles, the last partial
@pytest.mark.parametrize("mask_id", [MASK, None])
@pytest.mark.parametrize("temp", [[0.0, 0.0], [1.0, 0.7], [0.0, 2.5]])
def test_confidence_kernel_equals_ref(temp, mask_id, block):
    from twotower_kernels.confidence import confidence_triton

    for seed in (0, 1):
        logits = tied_logits(seed=seed)
        t = torch.tensor(temp)
        rows = row_inputs(seed=seed)
        pred_r, conf_r = confidence_ref(logits, t, *rows, mask_id=mask_id)
        pred_k, conf_k = confidence_triton(logits, t, *rows, mask_id=mask_id, block=block)
        assert torch.equal(pred_k, pred_r), (pred_k, pred_r)
        torch.testing.assert_close(conf_k, conf_r, rtol=1e-5, atol=1e-7)
        if mask_id is not None:
            assert not (pred_k == mask_id).any()


@_interpreter  # a few small launches (~2 s): kept in the fast loop
@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("mask_id", [MASK, None])
def test_confidence_kernel_with_floor_equals_ref(mask_id, block):
    """The floor in the kernel: sampled scores below it are -inf, greedy rows and conf ignore it.
    Floors from the filters, plus a hand-set one on a greedy row (ignored there) and at ties."""
    from twotower_kernels.confidence import confidence_triton

    logits, t, f, floor = filtered_inputs(B=5, seed=1)
    floor[2] = logits[2].amax(-1) + 1  # a greedy row: above every logit, and ignored
    floor[0, 0] = logits[0, 0].sort(descending=True).values[3]  # a tie-rich floor, set by hand
    rows = row_inputs(B=5, seed=1)
    pred_r, conf_r = confidence_ref(logits, t, *rows, mask_id=mask_id, floor=floor)
    pred_k, conf_k = confidence_triton(logits, t, *rows, mask_id=mask_id, block=block, floor=floor)
    assert torch.equal(pred_k, pred_r), (pred_k, pred_r)
    torch.testing.assert_close(conf_k, conf_r, rtol=1e-5, atol=1e-7)
    assert not torch.equal(pred_k, confidence_triton(logits, t, *rows, mask_id=mask_id, block=block)[0])
    with kernels.force("triton"):
        got = choose(logits, t, *rows, f)
    with kernels.force("ref"):
        want = choose(logits, t, *rows, f)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)


@needs_interpreter
def test_confidence_kernel_continuous_logits_and_views():
    """Random real-valued logits, a (B, 1, V) view of (B, V) logits (the AR path), and B, S, V = 1."""
    from twotower_kernels.confidence import confidence_triton

    g = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(3, 5, 41, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    rows = row_inputs(B=3, S=5, seed=2)
    for a, b in zip(confidence_ref(logits, t, *rows, mask_id=MASK), confidence_triton(logits, t, *rows, mask_id=MASK)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    flat = logits[:, 0, :]  # (B, V)
    rows1 = row_inputs(B=3, S=1, seed=3)
    with kernels.force("triton"):
        got = choose(flat[:, None, :], t, *rows1)
    with kernels.force("ref"):
        want = choose(flat[:, None, :], t, *rows1)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
    one = confidence_triton(logits[:1, :1, :1], t[:1], *row_inputs(B=1, S=1))
    assert one[0].item() == 0 and one[1].item() == 1.0


# -- ssd --------------------------------------------------------------------------------------------


def scan_inputs(B=2, n=16, nh=3, P=20, N=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, nh, P, generator=g)
    dt = F.softplus(torch.randn(B, n, nh, generator=g) - 1.0)
    A = -torch.exp(0.5 * torch.randn(nh, generator=g))
    Bm = torch.randn(B, n, nh, N, generator=g)
    Cm = torch.randn(B, n, nh, N, generator=g)
    state = torch.randn(B, nh, P, N, generator=g)  # a seeded (nonzero) initial state
    return x, dt, A, Bm, Cm, state


@needs_interpreter
@pytest.mark.parametrize("block_p", [None, 16])  # P = 20 in one slice / in two, the last partial
def test_ssd_kernel_equals_ref(block_p):
    from twotower_kernels.ssd import ssd_triton

    x, dt, A, Bm, Cm, state = scan_inputs(seed=1)
    dt[1, 11:] = 0.0  # padded tail: identity steps
    y_r, s_r = ssd_ref(x, dt, A, Bm, Cm, state)
    y_k, s_k = ssd_triton(x, dt, A, Bm, Cm, state, block_p=block_p)
    torch.testing.assert_close(y_k, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_k, s_r, rtol=1e-5, atol=1e-5)
    with kernels.force("triton"):
        y_d, s_d = kernels.block_scan(x[:, :3], dt[:, :3], A, Bm[:, :3], Cm[:, :3], state)
    y_r3, s_r3 = ssd_ref(x[:, :3], dt[:, :3], A, Bm[:, :3], Cm[:, :3], state)
    torch.testing.assert_close(y_d, y_r3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_d, s_r3, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_mamba_auto_scan_uses_the_dispatch():
    """Mamba2.forward(scan="auto"): the chunked torch scan on CPU by default (bitwise), the block
    scan kernel when the dispatch picks Triton (to rounding), for a block over a seeded state."""
    cfg = tiny_cfg(hybrid_override_pattern="M")
    mixer = random_model(cfg, seed=2).denoiser_tower.layers[0].mixer
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, cfg.hidden_size, generator=g)
    conv = torch.randn(2, cfg.conv_dim, cfg.conv_kernel - 1, generator=g)
    ssm = torch.randn(2, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, generator=g)
    with torch.no_grad():
        want = mixer(h, conv, ssm, None, "chunked")
        same = mixer(h, conv, ssm, None, "auto")
        with kernels.force("triton"):
            got = mixer(h, conv, ssm, None, "auto")
    for a, b, c in zip(want, same, got):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


# -- on a GPU: compiled kernels, and a speed print ----------------------------------------------------


def _time(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


@gpu
@needs_cuda
def test_gpu_confidence_and_noise():
    from twotower_kernels.confidence import confidence_triton, gumbel_triton

    dev = "cuda"
    rows = row_inputs(B=8, S=16, seed=0, device=dev)
    assert torch.equal(gumbel_triton(*rows, 1000), gumbel(*rows, 1000))
    V = 32000
    logits = tied_logits(B=8, S=16, V=V, device=dev) + 0.01 * torch.randn(8, 16, V, device=dev)
    t = torch.tensor([0.0, 0.7, 1.0, 0.0, 1.3, 0.2, 0.0, 1.0], device=dev)
    pred_r, conf_r = confidence_ref(logits, t, *rows, mask_id=MASK)
    pred_k, conf_k = confidence_triton(logits, t, *rows, mask_id=MASK)
    assert torch.equal(pred_k, pred_r)
    torch.testing.assert_close(conf_k, conf_r, rtol=1e-5, atol=1e-7)
    with kernels.force("auto"):
        assert kernels.backend(dev) == "triton"
        got = choose(logits, t, *rows)
    with kernels.force("ref"):
        want = choose(logits, t, *rows)
    assert torch.equal(got[0], want[0])
    f = row_filters(8)  # each filter, all three and none (host tensors, as the engine passes them)
    floor = sampling_floor(logits, t, *f)
    pred_f, conf_f = confidence_triton(logits, t, *rows, mask_id=MASK, floor=floor)
    pred_fr, conf_fr = confidence_ref(logits, t, *rows, mask_id=MASK, floor=floor)
    assert torch.equal(pred_f, pred_fr)
    torch.testing.assert_close(conf_f, conf_fr, rtol=1e-5, atol=1e-7)
    with kernels.force("auto"):
        got = choose(logits, t, *rows, f)
    with kernels.force("ref"):
        want = choose(logits, t, *rows, f)
    assert torch.equal(got[0], want[0])
    ms_f = _time(lambda: sampling_floor(logits, t, *f))
    ms_kf = _time(lambda: confidence_triton(logits, t, *rows, mask_id=MASK, floor=floor))
    print(f"\nsampling_floor (top-p over the full vocab) {ms_f:.3f} ms, kernel with floor {ms_kf:.3f} ms")
    ms_k = _time(lambda: confidence_triton(logits, t, *rows, mask_id=MASK))
    ms_r = _time(lambda: confidence_ref(logits, t, *rows, mask_id=MASK))
    print(f"\nconfidence B=8 S=16 V={V}: triton {ms_k:.3f} ms, ref {ms_r:.3f} ms")


@gpu
@needs_cuda
def test_gpu_ssd_release_shapes():
    from twotower_kernels.ssd import ssd_triton

    args = [t.cuda() for t in scan_inputs(B=4, n=16, nh=64, P=64, N=128, seed=4)]
    y_r, s_r = ssd_ref(*args)
    y_k, s_k = ssd_triton(*args)
    torch.testing.assert_close(y_k, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_k, s_r, rtol=1e-5, atol=1e-5)
    ms_k = _time(lambda: ssd_triton(*args))
    ms_c = _time(lambda: ssd_chunked(*args, 16))
    ms_r = _time(lambda: ssd_ref(*args))
    print(f"\nssd B=4 n=16 nh=64 P=64 N=128: triton {ms_k:.3f} ms, chunked {ms_c:.3f} ms, sequential {ms_r:.3f} ms")
