"""Shared pytest setup."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

# The tests use tiny shapes: one intra-op thread is fastest, and on a shared or busy machine
# several OpenMP threads spin against each other (measured: a tiny forward 4 ms with one thread,
# 870 ms with two on a loaded 2-core box). Override with TWOTOWER_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("TWOTOWER_TEST_THREADS", "1")))
# The checkpoint digest cache (model/content_hash.py): never the user's real ~/.cache in tests.
os.environ.setdefault("TWOTOWER_CACHE_DIR", tempfile.mkdtemp(prefix="twotower-test-cache-"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny checkpoint with the character tokenizer, for the CLI and pipeline tests. The
    heads are scaled up so that greedy decisions have margins (as a trained model's do) and the
    outputs are varied, not one repeated token."""
    from model_helpers import random_model

    from twotower_cli import ModelConfig, save_pretrained
    from twotower_cli.training.tokenizer_build import save_tokenizer, vocab

    d = tmp_path_factory.mktemp("ckpt") / "tiny-random"
    m = random_model(ModelConfig.tiny(vocab_size=len(vocab())), seed=0)
    with torch.no_grad():
        m.lm_head.weight.mul_(4)
        m.context_lm_head.weight.mul_(4)
    save_pretrained(m, d)
    save_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def no_eos_model_dir(model_dir, tmp_path_factory) -> Path:
    """The same weights with the EOS id set to the mask id, which diffusion never proposes: every
    diffusion row runs to its max_new_tokens (long rows in flight; rows a stop string can end)."""
    import json
    import shutil

    d = tmp_path_factory.mktemp("ckpt") / "tiny-no-eos"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    return d
