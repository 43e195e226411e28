"""Small, plain decoders for measuring the tiny model while it trains (SPEC.md §5, greedy).

Why here and not the engine: training needs quality numbers before (and independently of) the
real decoding engine, and an independent implementation of §5 is a useful cross-check for it.
These loops are batched for speed but every decision is per row (t, confidence, commit count),
so a row's output does not depend on its batch. They are greedy only.

Stats: NFE counts denoiser forwards a row took part in while it still had masked positions;
`tokens_per_step` = tokens up to and including the first EOS / NFE (the raw count of decoded
tokens, including the rest of the EOS block, is reported as `raw_tokens_per_step`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..model.twotower import TowerState, TwoTower


def _pad_right(seqs: Sequence[Sequence[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def _cut(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to and including the first EOS."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def generate_ar(model: TwoTower, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy AR with the context tower alone. Returns each row's tokens, cut after EOS."""
    eos = set(model.config.eos_ids)
    ids, lens = _pad_right(prompts)
    state = model.new_state(len(prompts))
    logits = model.context_extend(ids, state, n_valid=lens, logits=True)  # (B, V)
    out: list[list[int]] = [[] for _ in prompts]
    live = torch.arange(len(prompts))
    for _ in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (b,)
        keep = []
        for j, r in enumerate(live.tolist()):
            out[r].append(int(nxt[j]))
            if int(nxt[j]) not in eos:
                keep.append(j)
        if not keep or len(out[int(live[0])]) >= max_new_tokens:
            break
        if len(keep) < len(live):
            sel = torch.tensor(keep)
            live, nxt, state = live[sel], nxt[sel], state.select(sel)
        logits = model.context_extend(nxt[:, None], state, logits=True)
    return out


@torch.no_grad()
def generate_mock_ar(model: TwoTower, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy mock-AR: the denoiser reads the last committed token over the context of the rest."""
    eos = set(model.config.eos_ids)
    ids, lens = _pad_right([p[:-1] for p in prompts])
    state = model.new_state(len(prompts))
    model.context_extend(ids, state, n_valid=lens)
    last = torch.tensor([p[-1] for p in prompts], dtype=torch.long)
    out: list[list[int]] = [[] for _ in prompts]
    live = torch.arange(len(prompts))
    for step in range(max_new_tokens):
        nxt = model.denoise(last[:, None], state, None)[:, 0].argmax(-1)  # (b,)
        keep = []
        for j, r in enumerate(live.tolist()):
            out[r].append(int(nxt[j]))
            if int(nxt[j]) not in eos:
                keep.append(j)
        if not keep or step + 1 >= max_new_tokens:
            break
        model.context_extend(last[:, None], state)  # the context tower reads the committed token
        sel = torch.tensor(keep)
        live, last, state = live[sel], nxt[sel], state.select(sel)
    return out


def commit_count(n: Tensor, confident: Tensor, k: int, steps: int) -> Tensor:
    """SPEC §5 threshold rule: how many masked positions each row commits at step k."""
    if k == steps - 1:
        return n
    c = confident.clamp(min=1)
    return torch.minimum(torch.maximum(c, torch.ceil(n / (steps - k)).long()), n)


def denoise_block(
    model: TwoTower, state: TowerState, block_size: int, steps: int, gamma: float, mask_id: int,
    eos_id: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode one block of every row over `state` (not modified). Returns (tokens (B, S), nfe (B,)).

    With `eos_id`, a row stops as soon as every position up to an EOS is committed (what follows
    would be cut; the engine does the same): its remaining positions are filled with EOS."""
    B = state.batch
    xt = torch.full((B, block_size), mask_id, dtype=torch.long)
    nfe = torch.zeros(B, dtype=torch.long)
    pos = torch.arange(block_size)
    for k in range(steps):
        masked = xt == mask_id  # (B, S)
        n = masked.sum(1)
        if not bool((n > 0).any()):
            break
        nfe += (n > 0).long()
        t = masked.float().mean(1)  # per row
        logits = model.denoise(xt, state, t)  # (B, S, V)
        logits[..., mask_id] = float("-inf")
        conf, pred = logits.softmax(-1).max(-1)  # temperature-1 confidence, greedy prediction
        c = commit_count(n, ((conf > gamma) & masked).sum(1), k, steps)
        # rank the masked positions by confidence, ties to the lower position (stable sort)
        score = torch.where(masked, conf, torch.full_like(conf, -1.0))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, pos.expand(B, -1).contiguous())
        commit = masked & (rank < c[:, None])
        xt = torch.where(commit, pred, xt)
        if eos_id is not None:
            decided = ((xt == eos_id) & (xt != mask_id).long().cumprod(1).bool()).any(1)
            xt = torch.where(decided[:, None] & (xt == mask_id), eos_id, xt)
    return xt, nfe


@torch.no_grad()
def generate_diffusion(
    model: TwoTower,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    gamma: float = 0.8,
    block_size: int = 16,
    steps: int = 16,
    mask_id: int = 3,
) -> tuple[list[list[int]], list[int]]:
    """Greedy block mask diffusion. Returns (tokens cut after EOS, NFE per row)."""
    eos = set(model.config.eos_ids)
    ids, lens = _pad_right(prompts)
    state = model.new_state(len(prompts))
    model.context_extend(ids, state, n_valid=lens)
    out: list[list[int]] = [[] for _ in prompts]
    nfes = [0] * len(prompts)
    live = torch.arange(len(prompts))
    while len(live):
        block, nfe = denoise_block(model, state, block_size, steps, gamma, mask_id,
                                    min(eos) if len(eos) == 1 else None)
        keep = []
        for j, r in enumerate(live.tolist()):
            out[r].extend(block[j].tolist())
            nfes[r] += int(nfe[j])
            if not any(x in eos for x in block[j].tolist()) and len(out[r]) < max_new_tokens:
                keep.append(j)
        if not keep:
            break
        sel = torch.tensor(keep)
        live, block, state = live[sel], block[sel], state.select(sel)
        model.context_extend(block, state)  # the context tower reads the committed block
    return [_cut(o[:max_new_tokens], eos) for o in out], nfes


def evaluate(
    model: TwoTower,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    examples: Sequence[tuple[str, str, str]],
    mode: str = "ar",
    max_new_tokens: int = 48,
    batch_size: int = 64,
    **diffusion_kw,
) -> dict:
    """Exact-match accuracy per task (and tokens per step for diffusion) on (task, prompt, answer).

    `encode` turns a prompt into the ids the model reads (BOS first, as the tokenizer does)."""
    eos = set(model.config.eos_ids)
    hits: dict[str, list[int]] = defaultdict(list)
    tokens = raw = steps = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [encode(p) for _, p, _ in chunk]
        if mode == "ar":
            outs = generate_ar(model, prompts, max_new_tokens)
        elif mode == "mock-ar":
            outs = generate_mock_ar(model, prompts, max_new_tokens)
        else:
            outs, nfes = generate_diffusion(model, prompts, max_new_tokens, **diffusion_kw)
            steps += sum(nfes)
            bs = diffusion_kw.get("block_size", 16)
            raw += sum(min(math.ceil(len(o) / bs) * bs, max_new_tokens) for o in outs)
        tokens += sum(len(o) for o in outs)
        for (task, _, answer), o in zip(chunk, outs):
            text = decode([t for t in o if t not in eos])
            hits[task].append(int(text == answer and len(o) > 0 and o[-1] in eos))
    acc = {task: sum(h) / len(h) for task, h in hits.items()}
    res = {"mode": mode, "accuracy": sum(sum(h) for h in hits.values()) / len(examples), "per_task": acc}
    if mode == "diffusion":
        res["tokens_per_step"] = tokens / max(steps, 1)
        res["raw_tokens_per_step"] = raw / max(steps, 1)
        res["nfe"] = steps
    return res
