"""The executable spec: SPEC.md §5's three modes, the batch in lockstep, no cleverness.

Every faster path is tested token for token against this file. It keeps the batch together until
every row is done, recomputes nothing cleverly and chooses commits with a per-row Python loop, so
it shares no logic with the streamlined engine except the model's forward passes and the sampling
noise (which is part of the spec: keyed by seed, row, position and step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from twotower_kernels.confidence import gumbel

from ..config import DecodeParams
from ..model.twotower import TwoTower


def _pick(logits: Tensor, p: DecodeParams, key: int, positions: list[int], step: int) -> Tensor:
    """logits (n, V) of one row -> tokens (n,). Greedy or Gumbel-max at temperature p.temperature."""
    if p.temperature <= 0:
        return logits.argmax(-1)
    pos = torch.tensor([positions], device=logits.device)
    g = gumbel(torch.tensor([p.seed]), torch.tensor([key]), pos, torch.tensor([step]), logits.shape[-1])[0]
    return (logits / p.temperature + g).argmax(-1)


def _finish(tokens: list[int], p: DecodeParams, eos: set[int]) -> tuple[list[int], str]:
    out = tokens[: p.max_new_tokens]
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1], "eos"
    return out, "length"


def _prefill(model: TwoTower, prompts: list[list[int]], drop_last: bool = False):
    B = len(prompts)
    lens = [len(x) - (1 if drop_last else 0) for x in prompts]
    n = max(max(lens), 1)
    ids = torch.zeros(B, n, dtype=torch.long)
    for b, x in enumerate(prompts):
        ids[b, : lens[b]] = torch.tensor(x[: lens[b]], dtype=torch.long)
    state = model.new_state(B)
    logits = model.context_extend(ids, state, n_valid=torch.tensor(lens), logits=True)
    return state, logits


@torch.no_grad()
def generate_ar(model: TwoTower, prompts: list[list[int]], params: list[DecodeParams], keys: list[int],
                eos: set[int]) -> list[tuple[list[int], str]]:
    """AR: the context tower alone; greedy or sampled next token; stop at EOS or the limit."""
    B = len(prompts)
    state, logits = _prefill(model, prompts)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    while not all(done):
        nxt = [int(_pick(logits[b : b + 1], params[b], keys[b], [len(out[b])], 0)[0]) for b in range(B)]
        for b in range(B):
            if not done[b]:
                out[b].append(nxt[b])
                done[b] = nxt[b] in eos or len(out[b]) >= params[b].max_new_tokens
        if all(done):
            break
        logits = model.context_extend(torch.tensor(nxt)[:, None], state, logits=True)
    return [_finish(o, p, eos) for o, p in zip(out, params)]


@torch.no_grad()
def generate_mock_ar(model: TwoTower, prompts: list[list[int]], params: list[DecodeParams], keys: list[int],
                     eos: set[int]) -> list[tuple[list[int], str]]:
    """Mock-AR: one token per step from the denoiser (no time conditioning). The denoiser reads
    the last committed token at its own position over the context state of everything before it."""
    B = len(prompts)
    state, _ = _prefill(model, prompts, drop_last=True)  # the context holds all but the last token
    last = [x[-1] for x in prompts]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    while not all(done):
        logits = model.denoise(torch.tensor(last)[:, None], state, None)[:, 0]  # (B, V)
        nxt = [int(_pick(logits[b : b + 1], params[b], keys[b], [len(out[b])], 0)[0]) for b in range(B)]
        for b in range(B):
            if not done[b]:
                out[b].append(nxt[b])
                done[b] = nxt[b] in eos or len(out[b]) >= params[b].max_new_tokens
        if all(done):
            break
        model.context_extend(torch.tensor(last)[:, None], state)  # commit: the context reads it
        last = nxt
    return [_finish(o, p, eos) for o, p in zip(out, params)]


@torch.no_grad()
def generate_mask_diffusion(model: TwoTower, prompts: list[list[int]], params: list[DecodeParams],
                            keys: list[int], eos: set[int], early_exit: bool = False
                            ) -> list[tuple[list[int], str, int]]:
    """Mask diffusion, block by block (SPEC.md §5 pseudo-code). Returns (tokens, reason, NFE).

    early_exit=False is the released loop: every block is decoded to its end. early_exit=True
    stops a row as soon as its output is decided (every position up to an EOS or up to the
    token limit committed); the tokens are the same, only the NFE drops (ours)."""
    B = len(prompts)
    S, T, mask = params[0].block_size, params[0].steps_per_block, params[0].mask_token_id
    assert all(p.block_size == S and p.steps_per_block == T for p in params), "one S and T per batch"
    state, _ = _prefill(model, prompts)
    out: list[list[int]] = [[] for _ in range(B)]
    nfe = [0] * B
    done = [False] * B
    while not all(done):
        xt = torch.full((B, S), mask, dtype=torch.long)
        keep = [S] * B  # how much of this block each row keeps
        for k in range(T):
            masked = xt == mask
            active = [b for b in range(B) if not done[b] and keep[b] == S and bool(masked[b].any())]
            if not active:
                break
            t = masked.float().mean(1)  # per row (ours)
            logits = model.denoise(xt, state, t)  # (B, S, V)
            logits[:, :, mask] = -float("inf")
            probs = torch.softmax(logits, dim=-1)  # confidence always at temperature 1
            for b in active:
                nfe[b] += 1
                base = len(out[b])
                pred = _pick(logits[b], params[b], keys[b], list(range(base, base + S)), k)
                conf = probs[b].gather(-1, pred[:, None])[:, 0]
                idx = [j for j in range(S) if masked[b, j]]
                n = len(idx)
                if k == T - 1:
                    c = n
                else:
                    c = max(sum(1 for j in idx if conf[j] > params[b].gamma), 1)
                    c = min(max(c, math.ceil(n / (T - k))), n)
                # highest confidence first; ties: higher position first (as the release)
                chosen = sorted(idx, key=lambda j: (-float(conf[j]), -j))[:c]
                for j in chosen:
                    xt[b, j] = pred[j]
                if early_exit:
                    for j in range(S):
                        if xt[b, j] == mask:
                            break
                        if int(xt[b, j]) in eos or base + j + 1 >= params[b].max_new_tokens:
                            keep[b] = j + 1
                            break
        for b in range(B):
            if not done[b]:
                out[b].extend(xt[b, : keep[b]].tolist())
                o = out[b][: params[b].max_new_tokens]
                done[b] = any(t in eos for t in o) or len(out[b]) >= params[b].max_new_tokens
        if all(done):
            break
        model.context_extend(xt, state)  # the context tower reads the committed block
    return [(*_finish(o, p, eos), f) for o, p, f in zip(out, params, nfe)]
