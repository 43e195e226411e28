"""Train the embedded tiny TwoTower the way the release was made, in two stages, on CPU.

Stage 1 (AR): the context tower is an ordinary causal LM on `<s> prompt answer </s>`; the loss
is on the answer tokens and EOS only (prompts are random strings: nothing there to learn).

Stage 2 (denoiser): the context tower is copied into the denoiser tower (and `context_lm_head`
into `lm_head`) and frozen. adaLN-single starts as the identity (t_block's last Linear zero,
every scale_shift_tables row (shift 0, scale 0, gate 1)), so the denoiser starts *equal* to the
trained AR tower. It then learns the block-diffusion objective: a block of S target tokens that
starts where inference would start one (prompt end + k*S; positions after EOS are EOS, so "the
answer is over" becomes a confident prediction), each token masked with probability p ~ U(0,1)
(at least one), t = the masked fraction, the context tower's state of the clean prefix as the
context, cross-entropy on the masked positions only. Mixed into every step: mock-AR rows (t=None,
a 1-token "block" holding the last committed token, the context of everything before it, target
the next token), so the one denoiser also serves SPEC §5's mock-AR mode.

Everything is seeded (data from `random.Random`, weights and masks from torch generators);
with the same thread count a run is repeatable.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ModelConfig
from ..model.twotower import TowerState, TwoTower
from . import tasks as T
from .evaluate import evaluate
from .tokenizer_build import BOS_ID, EOS_ID, MASK_ID, PAD_ID, build_tokenizer, save_tokenizer


def tiny_model_config(vocab_size: int) -> ModelConfig:
    """The shipped tiny model: every layer kind (M, *, E, -), hidden 128, 4 experts top-2.

    conv_kernel 16 (the release uses 4): the denoiser fills a block's positions in parallel by
    reading the frozen context tower's keys, and with NoPE attention the only offset information
    in a key is what the Mamba layers put there. With a window of 4 a key sees 3 characters back,
    and a copy-only probe (600 + 600 steps) predicted exactly the first 3 positions of a fully
    masked block; with 16 it predicted most of the block and the denoiser's loss halved."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=9,
        hybrid_override_pattern="M*-M*EM*E",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        mamba_num_heads=8,
        mamba_head_dim=32,
        ssm_state_size=16,
        n_groups=1,
        conv_kernel=16,
        chunk_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=256,
        intermediate_size=512,
        routed_scaling_factor=1.0,
        max_position_embeddings=4096,
        torch_dtype="float32",
    )


@torch.no_grad()
def init_for_training(model: TwoTower, seed: int) -> None:
    """Re-initialise the context tower with fan-in scaled weights before stage 1.

    Why: `TwoTower.init_weights` uses a flat std 0.02 (right for a 2688-wide model, ~6x too small
    at width 128), which leaves attention uniform and the conv silent for hundreds of steps. Here
    Linear weights get std 1/sqrt(fan_in), the residual outputs (o_proj, out_proj, down_proj) that
    again divided by sqrt(2 * layers), the depthwise conv the PyTorch default, embeddings std 1.
    """
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_hidden_layers
    for name, p in model.context_tower.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("conv1d.weight"):
            bound = 1 / math.sqrt(p.shape[-1])
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
        elif name.endswith("embeddings.weight"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif leaf == "weight" and p.dim() == 2:
            std = 1 / math.sqrt(p.shape[1])
            if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
                std /= math.sqrt(2 * n_layers)
            p.copy_(torch.randn(p.shape, generator=g) * std)
    head = model.context_lm_head.weight
    head.copy_(torch.randn(head.shape, generator=g) / math.sqrt(head.shape[1]))


@dataclass
class TrainConfig:
    seed: int = 0
    ar_steps: int = 2400
    denoiser_steps: int = 3400
    batch_size: int = 32
    ar_lr: float = 3e-3
    denoiser_lr: float = 1.5e-3
    warmup: int = 50
    weight_decay: float = 0.01
    block_size: int = 16
    mock_ar_rows: int = 16  # mock-AR rows added to each denoiser step
    mask_repeats: int = 4  # independent maskings of each block per context forward
    eval_per_task: int = 40
    log_every: int = 50
    threads: int = 2
    init: bool = True  # fan-in scaled init before stage 1 (see init_for_training)
    # count is the hardest task for the tiny model: it gets twice the share of the others
    tasks: tuple[str, ...] = ("copy", "reverse", "sort", "count", "count", "recall")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


class Encoded:
    """A batch of `<s> prompt answer </s>` sequences as token lists, with each prompt's length."""

    def __init__(self, encode: Callable[[str], list[int]], examples: list[tuple[str, str, str]]):
        self.seqs: list[list[int]] = []
        self.prompt_lens: list[int] = []
        for _, prompt, answer in examples:
            p = [BOS_ID] + encode(prompt)
            self.seqs.append(p + encode(answer) + [EOS_ID])
            self.prompt_lens.append(len(p))


def char_encoder() -> Callable[[str], list[int]]:
    """Encode text without specials, through the same tokenizer the checkpoint ships."""
    tok = build_tokenizer()
    return lambda s: tok.encode(s, add_special_tokens=False).ids


def pad(seqs: list[list[int]], value: int = PAD_ID) -> Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs], dtype=torch.long)


def batches(seed: int, size: int, encode, tasks: tuple[str, ...] = T.TASKS) -> Iterator[Encoded]:
    stream = T.train_stream(seed, tasks)
    while True:
        yield Encoded(encode, [next(stream) for _ in range(size)])


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


def length_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices grouped by sorted length so that each group pads to at most `budget` tokens.

    Why: the tasks' lengths differ by 4x; padding a whole batch to its longest row would more
    than double the work of a CPU step.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = [[]]
    for i in order:
        if groups[-1] and lengths[i] * (len(groups[-1]) + 1) > budget:
            groups.append([])
        groups[-1].append(i)
    return groups


def ar_loss(model: TwoTower, b: Encoded, budget: int = 2048) -> Tensor:
    """Causal LM cross-entropy on the answer tokens and EOS (mean over those tokens)."""
    total, count = 0.0, 0
    for group in length_groups([len(s) for s in b.seqs], budget):
        seqs = [b.seqs[i] for i in group]
        ids = pad(seqs)  # (b, L)
        logits = model.context_logits(ids[:, :-1])  # (b, L-1, V)
        target = ids[:, 1:].clone()
        pos = torch.arange(target.shape[1])[None]
        plen = torch.tensor([b.prompt_lens[i] for i in group])[:, None]
        lens = torch.tensor([len(s) for s in seqs])[:, None]
        keep = (pos >= plen - 1) & (pos < lens - 1)  # predicting answer[0] .. EOS
        total = total + F.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    return total / count


@torch.no_grad()
def context_state(model: TwoTower, prefixes: list[list[int]], budget: int = 4096) -> TowerState:
    """The frozen context tower's state after each row's clean prefix (rows in the given order)."""
    groups = length_groups([len(x) for x in prefixes], budget)
    states = [model.prefill([prefixes[i] for i in group])[0] for group in groups]
    order = [i for group in groups for i in group]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return TowerState.concat(states).select(inverse)


def sample_masks(B: int, S: int, g: torch.Generator, full: float = 0.25, prefix: float = 0.35) -> Tensor:
    """(B, S) bool, True = masked; at least one per row. Three kinds of rows:

    - `full`: every position masked. Every block's decoding starts there, and what the
      denoiser is confident about in that state is what it commits with no help at all.
    - `prefix`: a committed prefix of random length c, then the rest masked with probability
      p ~ U(0,1) (position c always): the states threshold decoding visits next.
    - the rest: each position masked with probability p ~ U(0,1) (the plain objective).
    """
    kind = torch.rand(B, 1, generator=g)
    p = torch.rand(B, 1, generator=g)
    iid = torch.rand(B, S, generator=g) < p
    pos = torch.arange(S)[None]
    c = torch.randint(0, S, (B, 1), generator=g)
    after = (pos >= c) & (iid | (pos == c))
    masked = torch.where(kind < full, torch.ones_like(iid), torch.where(kind < full + prefix, after, iid))
    none = ~masked.any(1)
    masked[none, torch.randint(0, S, (B,), generator=g)[none]] = True
    return masked


def diffusion_loss(
    model: TwoTower, b: Encoded, S: int, rng: random.Random, g: torch.Generator, repeats: int = 1,
) -> Tensor:
    """Block-diffusion cross-entropy on the masked positions of one inference-aligned block per row.

    Each row's block is masked `repeats` times independently over one context state: the frozen
    context forward costs more than the denoiser's, so reusing it is nearly free extra signal.
    """
    prefixes, targets = [], []
    for seq, P in zip(b.seqs, b.prompt_lens):
        n_blocks = math.ceil((len(seq) - P) / S)  # the blocks inference decodes: answer + EOS
        start = P + S * rng.randrange(n_blocks)
        block = seq[start : start + S]
        prefixes.append(seq[:start])
        targets.append(block + [EOS_ID] * (S - len(block)))  # past the end: EOS
    rows = torch.arange(len(targets)).repeat_interleave(repeats)
    target = torch.tensor(targets)[rows]  # (B, S)
    Bsz = target.shape[0]
    masked = sample_masks(Bsz, S, g)
    t = masked.float().mean(1)  # (B,) the fraction still masked, as at inference
    state = context_state(model, prefixes)
    if repeats > 1:
        state = state.select(rows)
    logits = model.denoise(torch.where(masked, MASK_ID, target), state, t)[masked]  # (n, V)
    logits[:, MASK_ID] = float("-inf")  # never a target, never proposed (SPEC §5)
    return F.cross_entropy(logits, target[masked])


def mock_ar_loss(model: TwoTower, b: Encoded, rng: random.Random) -> Tensor:
    """Next-token cross-entropy of the denoiser without time conditioning (mock-AR): it reads the
    last committed token at its own position over the context state of everything before it."""
    prefixes, last, target = [], [], []
    for seq, P in zip(b.seqs, b.prompt_lens):
        j = rng.randrange(P - 1, len(seq) - 1)  # the last committed token: separator .. last answer token
        prefixes.append(seq[:j])
        last.append(seq[j])
        target.append(seq[j + 1])
    state = context_state(model, prefixes)
    logits = model.denoise(torch.tensor(last)[:, None], state, None)[:, 0]  # (B, V)
    return F.cross_entropy(logits, torch.tensor(target))


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimize(params, steps: int, lr: float, tc: TrainConfig, loss_fn, log: Callable[[str], None]) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    losses, run, t0 = [], 0.0, time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, lr, tc.warmup)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run += loss.item()
        if (step + 1) % tc.log_every == 0 or step + 1 == steps:
            n = (step % tc.log_every) + 1
            losses.append(round(run / n, 5))
            log(f"step {step + 1}/{steps} loss {run / n:.4f} ({time.time() - t0:.0f}s)")
            run = 0.0
    return losses


def train_ar(model: TwoTower, tc: TrainConfig, log=print) -> list[float]:
    """Stage 1: the context tower as a causal LM."""
    encode = char_encoder()
    data = batches(tc.seed, tc.batch_size, encode, tc.tasks)
    if tc.init:
        init_for_training(model, tc.seed)
    params = list(model.context_tower.parameters()) + list(model.context_lm_head.parameters())
    params = [p for p in params if p.requires_grad]
    model.train()
    return _optimize(params, tc.ar_steps, tc.ar_lr, tc, lambda step: ar_loss(model, next(data)), log)


@torch.no_grad()
def init_denoiser(model: TwoTower) -> None:
    """Copy the context tower into the denoiser and make adaLN-single the identity."""
    model.denoiser_tower.load_state_dict(model.context_tower.state_dict())
    model.lm_head.weight.copy_(model.context_lm_head.weight)
    model.t_block[1].weight.zero_()
    model.t_block[1].bias.zero_()
    for table in model.scale_shift_tables:
        table.copy_(torch.tensor([0.0, 0.0, 1.0])[:, None].expand_as(table))  # rows: shift, scale, gate


def denoiser_params(model: TwoTower) -> list[torch.nn.Parameter]:
    mods = [model.denoiser_tower, model.lm_head, model.t_embedder, model.t_block, model.scale_shift_tables]
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def train_denoiser(model: TwoTower, tc: TrainConfig, log=print) -> list[float]:
    """Stage 2: the denoiser (+ adaLN-single) over the frozen context tower."""
    init_denoiser(model)
    model.context_tower.requires_grad_(False)
    model.context_lm_head.requires_grad_(False)
    encode = char_encoder()
    data = batches(tc.seed + 1, tc.batch_size, encode, tc.tasks)
    mock = batches(tc.seed + 2, tc.mock_ar_rows, encode, tc.tasks)
    rng = random.Random(f"denoiser-{tc.seed}")
    g = torch.Generator().manual_seed(tc.seed + 3)
    model.train()

    def loss_fn(step: int) -> Tensor:
        loss = diffusion_loss(model, next(data), tc.block_size, rng, g, tc.mask_repeats)
        if tc.mock_ar_rows:
            loss = loss + mock_ar_loss(model, next(mock), rng)
        return loss

    return _optimize(denoiser_params(model), tc.denoiser_steps, tc.denoiser_lr, tc, loss_fn, log)


def run(out_dir: str | Path, tc: TrainConfig, log=print) -> dict:
    """Both stages, a held-out evaluation, and the checkpoint in the released layout."""
    from ..model.checkpoint import save_pretrained

    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    t_start = time.time()
    tok = build_tokenizer()
    model = TwoTower(tiny_model_config(tok.get_vocab_size()), seed=tc.seed)
    chars = char_encoder()

    def encode(text):  # a prompt as the engine sees it: BOS first
        return [BOS_ID] + chars(text)

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=False)

    held_out = T.eval_set(tc.eval_per_task, seed=tc.seed)
    log("stage 1: AR backbone")
    ar_losses = train_ar(model, tc, log)
    model.eval()
    ar = evaluate(model, encode, decode, held_out, mode="ar")
    log(f"AR held-out: {ar}")
    t_ar = time.time() - t_start
    log("stage 2: denoiser")
    dn_losses = train_denoiser(model, tc, log)
    model.eval()
    diff = evaluate(model, encode, decode, held_out, mode="diffusion", gamma=0.8, block_size=16, steps=16)
    log(f"diffusion held-out (gamma 0.8): {diff}")
    elapsed = time.time() - t_start
    model.requires_grad_(False)
    out = Path(out_dir)
    save_pretrained(model, out)
    save_tokenizer(out)
    report = {
        "train_config": asdict(tc),
        "model_config": model.config.to_dict(),
        "seconds": {"stage1_ar": round(t_ar, 1), "total": round(elapsed, 1)},
        "losses": {"ar": ar_losses, "denoiser": dn_losses, "log_every": tc.log_every},
        "held_out": {"eval_per_task": tc.eval_per_task, "ar": ar, "diffusion_gamma_0.8": diff},
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
