"""The embedded tiny model's recipe: tasks, tokenizer, both training stages, the shipped weights."""

from __future__ import annotations

import random

import pytest
import torch

from twotower_cli.config import DecodeParams, ModelConfig
from twotower_cli.engine import Engine, Request
from twotower_cli.model.checkpoint import default_checkpoint, load_model, save_pretrained
from twotower_cli.model.twotower import TwoTower
from twotower_cli.training import tasks as T
from twotower_cli.training import train as TR
from twotower_cli.training.evaluate import evaluate
from twotower_cli.training.tokenizer_build import (
    BOS_ID,
    CHAT_TEMPLATE,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    UNK_ID,
    build_tokenizer,
    save_tokenizer,
)

torch.set_num_threads(2)


# ---- tasks ---------------------------------------------------------------------------------------


def test_eval_set_is_deterministic_and_held_out():
    a = T.eval_set(5, seed=3)
    assert a == T.eval_set(5, seed=3)
    assert a != T.eval_set(5, seed=4)
    assert [t for t, _, _ in a] == [t for t in T.TASKS for _ in range(5)]
    assert all(p.endswith(T.SEPARATOR) and T.is_eval_prompt(p) for _, p, _ in a)
    stream = T.train_stream(0)
    train_prompts = {next(stream)[1] for _ in range(3000)}
    assert not train_prompts & {p for _, p, _ in T.eval_set(50, seed=0)}


def test_task_answers_are_exact():
    rng = random.Random(0)
    for _ in range(50):
        q, a = T.make_example("count", rng)
        s = q[len("count ") : -1]
        letters, counts = a[::2], a[1::2]
        assert letters == "".join(sorted(set(s))) and all(s.count(c) == int(n) for c, n in zip(letters, counts))
        assert all(c <= 9 for c in map(int, counts))  # one digit per count: strings are short enough
        q, a = T.make_example("sort", rng)
        assert a == "".join(sorted(q[len("sort ") : -1]))
        q, a = T.make_example("recall", rng)
        pairs, key = q[len("recall ") : -1].split(";")
        assert dict(p.split(":") for p in pairs.split())[key] == a


# ---- tokenizer -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def test_tokenizer_ids_and_round_trip(hf_tokenizer):
    tok = hf_tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id, tok.unk_token_id) == (
        PAD_ID, BOS_ID, EOS_ID, MASK_ID, UNK_ID,
    )
    assert tok.convert_ids_to_tokens(MASK_ID) == "<mask>"
    text = "copy Hello, world!  a+b=c\n\t~"
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert ids[1:] == build_tokenizer().encode(text, add_special_tokens=False).ids


def test_tokenizer_unknown_unicode_is_unk(hf_tokenizer):
    ids = hf_tokenizer("é日本🙂x")["input_ids"]
    assert ids == [BOS_ID, UNK_ID, UNK_ID, UNK_ID, UNK_ID, hf_tokenizer.convert_tokens_to_ids("x")]


def test_chat_template_renders_the_task_prompt(hf_tokenizer):
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "copy abc"}]
    text = hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<s>copy abc" + T.SEPARATOR
    ids = hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    assert ids == hf_tokenizer("copy abc" + T.SEPARATOR)["input_ids"]
    assert hf_tokenizer.chat_template == CHAT_TEMPLATE


# ---- training ------------------------------------------------------------------------------------


def micro_config() -> ModelConfig:
    cfg = ModelConfig.tiny(vocab_size=build_tokenizer().get_vocab_size())
    cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size = 32, 64, 32
    cfg.moe_shared_expert_intermediate_size, cfg.head_dim, cfg.mamba_head_dim = 32, 8, 8
    return cfg


def test_denoiser_starts_equal_to_the_context_tower():
    model = TwoTower(micro_config(), seed=1).eval()
    TR.init_denoiser(model)
    ids = torch.tensor([[BOS_ID, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        ar = model.context_logits(ids)[:, -1]
        state = model.new_state(1)
        model.context_extend(ids[:, :-1], state)
        mock = model.denoise(ids[:, -1:], state, None)[:, 0]
        timed = model.denoise(ids[:, -1:], state, torch.tensor([0.7]))[:, 0]
    torch.testing.assert_close(mock, ar, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(timed, ar, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # trains both stages
def test_training_smoke_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TwoTower(micro_config(), seed=0)
    tc = TR.TrainConfig(ar_steps=20, denoiser_steps=4, batch_size=8, mock_ar_rows=4, mask_repeats=2,
                        warmup=5, ar_lr=1e-2, denoiser_lr=3e-3, log_every=4)
    ar = TR.train_ar(model, tc, log=lambda m: None)
    assert ar[-1] < ar[0] - 0.3
    dn = TR.train_denoiser(model, tc, log=lambda m: None)
    assert len(dn) == 1 and all(torch.isfinite(torch.tensor(dn)))
    assert not any(p.requires_grad for p in model.context_tower.parameters())
    model.eval()
    save_pretrained(model, tmp_path)
    loaded = load_model(tmp_path)
    prompts = [[BOS_ID, 10, 11, 12, 20], [BOS_ID, 13, 20]]
    for mode in ("ar", "diffusion"):
        p = DecodeParams(mode=mode, max_new_tokens=8, block_size=4, steps_per_block=4)
        assert decode_all(loaded, prompts, p) == decode_all(model, prompts, p)


def decode_all(model, prompts, params):
    results = {r.id: r.tokens for r in Engine(model).run(Request(str(i), p, params) for i, p in enumerate(prompts))}
    return [results[str(i)] for i in range(len(prompts))]


# ---- the shipped model ---------------------------------------------------------------------------


@pytest.mark.skipif(default_checkpoint() is None, reason="no embedded checkpoint in assets/tiny")
def test_shipped_tiny_model_meets_the_ar_bar():
    from twotower_cli.model.tokenizer import load_tokenizer

    path = default_checkpoint()
    model = load_model(path)
    tok = load_tokenizer(path)
    assert model.config.vocab_size == len(tok)
    held_out = T.eval_set(4, seed=1)  # 20 prompts, never trained on

    def encode(s):
        return tok(s)["input_ids"]

    res = evaluate(model, encode, tok.decode, held_out, mode="ar")
    assert res["accuracy"] >= 0.95, res
    # A regression guard, not the product goal: on these 20 prompts the shipped denoiser gets 65%
    # at 3.8 tokens per step at γ=0.8 (README, `twotower bench`: ~60% of AR's quality on 100
    # prompts); the release's 98.7% is not reached.
    res = evaluate(model, encode, tok.decode, held_out, mode="diffusion", gamma=0.8)
    assert res["accuracy"] >= 0.45 and res["tokens_per_step"] >= 3.2, res


@pytest.mark.skipif(default_checkpoint() is None, reason="no embedded checkpoint in assets/tiny")
def test_training_evaluator_scores_the_reference_decoding():
    """The evaluator's figures on the shipped model equal those computed by hand from the
    executable spec (engine/reference.py, one row at a time, early exit at EOS): its accuracy rule
    (text equals the answer and the row ended with EOS) and tokens per denoiser step."""
    from twotower_cli.engine import reference as ref
    from twotower_cli.engine.request import row_key
    from twotower_cli.model.tokenizer import load_tokenizer

    path = default_checkpoint()
    model = load_model(path).eval()
    tok = load_tokenizer(path)
    examples = T.eval_set(2, seed=3)
    eos = set(model.config.eos_ids)
    for gamma in (0.5, 0.8):
        res = evaluate(model, lambda s: tok(s)["input_ids"], tok.decode, examples, mode="diffusion", gamma=gamma,
                       batch_size=4)
        p = DecodeParams(mode="diffusion", gamma=gamma, max_new_tokens=48)
        right = tokens = nfe = 0
        for i, (_, prompt, answer) in enumerate(examples):
            out, _, steps = ref.generate_mask_diffusion(model, [tok(prompt)["input_ids"]], [p], [row_key(str(i))],
                                                        eos, early_exit=True)[0]
            right += out[-1:] == [EOS_ID] and tok.decode(out[:-1]) == answer
            tokens, nfe = tokens + len(out), nfe + steps
        assert res["accuracy"] == right / len(examples)
        assert res["nfe"] == nfe and res["tokens_per_step"] == tokens / nfe
