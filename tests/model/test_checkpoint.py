"""Checkpoints (SPEC §4): round trips, exact key names, the aliases and AR-only layouts, every
bad-checkpoint error, and `twotower info`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from model_helpers import rand_ids, random_model, tiny_cfg
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from twotower_cli import CheckpointError, TwoTower, load_model, load_tokenizer, place_towers_on_devices
from twotower_cli import save_pretrained as save
from twotower_cli.cli import app
from twotower_cli.model.checkpoint import fingerprint, weight_dtypes

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _private_digest_cache(tmp_path, monkeypatch):
    """fingerprint() caches weight digests per user: never in the real home of whoever runs the tests."""
    monkeypatch.setenv("TWOTOWER_CACHE_DIR", str(tmp_path / "digest-cache"))


@pytest.fixture(scope="module")
def model():
    return random_model(seed=41)


@pytest.fixture
def saved(model, tmp_path):
    d = tmp_path / "ckpt"
    save(model, d)
    return d


def assert_same_model(a: TwoTower, b: TwoTower) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = rand_ids((2, 6), a.config.vocab_size, seed=42)
    with torch.no_grad():
        assert torch.equal(a.context_logits(ids), b.context_logits(ids))
        if not a.ar_only:
            sta, stb = a.new_state(2), b.new_state(2)
            a.context_extend(ids, sta)
            b.context_extend(ids, stb)
            blk, t = ids[:, :4], torch.tensor([1.0, 0.5])
            assert torch.equal(a.denoise(blk, sta, t), b.denoise(blk, stb, t))


def rewrite(file, change) -> None:
    """Load a safetensors file, let `change(dict)` edit it, write it back."""
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def spec_keys(cfg) -> set[str]:
    """The key names of SPEC.md §4 for a config, written out independently of the model code."""
    mixer = {
        "M": ["in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
              "out_proj.weight"],
        "*": ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"],
        "E": ["gate.weight", "gate.e_score_correction_bias", "shared_experts.up_proj.weight",
              "shared_experts.down_proj.weight"]
        + [f"experts.{e}.{p}.weight" for e in range(cfg.n_routed_experts) for p in ("up_proj", "down_proj")],
        "-": ["up_proj.weight", "down_proj.weight"],
    }
    keys = {"context_lm_head.weight", "lm_head.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
            "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "t_block.1.weight", "t_block.1.bias"}
    for tower in ("context_tower", "denoiser_tower"):
        keys |= {f"{tower}.embeddings.weight", f"{tower}.norm_f.weight"}
        for n, kind in enumerate(cfg.hybrid_override_pattern):
            keys.add(f"{tower}.layers.{n}.norm.weight")
            keys |= {f"{tower}.layers.{n}.mixer.{m}" for m in mixer[kind]}
    keys |= {f"scale_shift_tables.{n}" for n in range(cfg.num_hidden_layers)}
    return keys


# ------------------------------------------------------------------------------------------------
# round trips and layouts
# ------------------------------------------------------------------------------------------------


def test_round_trip_single_file(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(saved)
    assert not loaded.ar_only and loaded.config.to_dict() == model.config.to_dict()
    assert_same_model(model, loaded)


def test_round_trip_sharded(model, tmp_path):
    d = tmp_path / "sharded"
    save(model, d, max_shard_size=60_000)
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"].keys() == spec_keys(model.config)
    for s in shards:  # no shard over the limit unless it holds a single larger tensor
        n = len(load_file(str(d / s)))
        assert (d / s).stat().st_size <= 60_000 + 10_000 or n == 1
    assert not (d / "model.safetensors").exists()
    assert_same_model(model, load_model(d))
    # saving again as one file (through what load_model returns) removes the shards and the index
    load_model(d).save_pretrained(d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_model(model, load_model(d))


def test_saved_keys_and_shapes_are_the_spec_names(model, saved):
    tensors = load_file(str(saved / "model.safetensors"))
    cfg = model.config
    assert tensors.keys() == spec_keys(cfg)
    H = cfg.hidden_size
    assert tensors["t_embedder.mlp.0.weight"].shape == (H, 256)
    assert tensors["t_embedder.mlp.2.weight"].shape == (H, H)
    assert tensors["t_block.1.weight"].shape == (3 * H, H)
    assert tensors["scale_shift_tables.5"].shape == (3, H)
    assert tensors["denoiser_tower.layers.2.mixer.experts.3.up_proj.weight"].shape == (cfg.moe_intermediate_size, H)
    assert tensors["context_lm_head.weight"].shape == (cfg.vocab_size, H)
    saved_cfg = json.loads((saved / "config.json").read_text())
    assert saved_cfg["hybrid_override_pattern"] == cfg.hybrid_override_pattern
    assert saved_cfg["model_type"] == "nemotron_h" and saved_cfg["torch_dtype"] == "float32"


def test_embedding_alias(model, saved):
    def alias(t):
        for tower in ("context_tower", "denoiser_tower"):
            t[f"{tower}.embedding.weight"] = t.pop(f"{tower}.embeddings.weight")

    rewrite(saved / "model.safetensors", alias)
    assert_same_model(model, load_model(saved))


@pytest.mark.parametrize("emb", ["embeddings", "embedding"])
def test_nemotronh_backbone_checkpoint_loads_ar_only(model, saved, emb):
    def to_backbone(t):
        old = dict(t)
        t.clear()
        for k, v in old.items():
            if k.startswith("context_tower."):
                t["backbone." + k.removeprefix("context_tower.").replace("embeddings.", f"{emb}.")] = v
            elif k == "context_lm_head.weight":
                t["lm_head.weight"] = v  # NemotronH's head; the denoiser's lm_head is dropped

    rewrite(saved / "model.safetensors", to_backbone)
    assert all(k.startswith("backbone.") or k == "lm_head.weight" for k in load_file(str(saved / "model.safetensors")))
    loaded = load_model(saved)
    assert loaded.ar_only and not hasattr(loaded, "denoiser_tower")
    ids = rand_ids((2, 6), model.config.vocab_size, seed=43)
    with torch.no_grad():
        assert torch.equal(loaded.context_logits(ids), model.context_logits(ids))
        with pytest.raises(RuntimeError, match="AR mode only"):
            loaded.denoise(ids, loaded.new_state(2), None)


def test_context_only_twotower_checkpoint_round_trip(tmp_path):
    ar = random_model(seed=44, ar_only=True)
    save(ar, tmp_path / "ar")
    loaded = load_model(tmp_path / "ar")
    assert loaded.ar_only
    assert_same_model(ar, loaded)


def test_dtypes_fp32_params_and_defaults(model, tmp_path):
    bf = random_model(seed=45).cast(torch.bfloat16)
    save(bf, tmp_path / "bf")
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert weight_dtypes(tmp_path / "bf").keys() == {"bfloat16", "float32"}
    on_cpu = load_model(tmp_path / "bf")  # CPU default: float32 whatever the config says
    assert {p.dtype for p in on_cpu.parameters()} == {torch.float32}
    assert torch.equal(on_cpu.lm_head.weight, bf.lm_head.weight.float())
    half = load_model(tmp_path / "bf", dtype="bfloat16")
    for name, p in half.named_parameters():
        keep = name.endswith(("A_log", ".D", "dt_bias", "e_score_correction_bias", "mixer.gate.weight"))
        assert p.dtype == (torch.float32 if keep else torch.bfloat16), name
    with pytest.raises(CheckpointError, match="unknown dtype"):
        load_model(tmp_path / "bf", dtype="int8")


def test_meta_load_allocates_nothing_and_placement(model, saved):
    meta = load_model(saved, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == model.config.param_counts()["params_total"]
    # tower placement: context on one device, denoiser + heads + adaLN on the other
    m = load_model(saved)
    place_towers_on_devices(m, "cpu", "meta")
    for name, p in m.named_parameters():
        want = "cpu" if name.startswith(("context_tower.", "context_lm_head.")) else "meta"
        assert p.device.type == want, name


def test_fingerprint(model, saved, tmp_path):
    f = fingerprint(saved)
    assert f == fingerprint(saved) and len(f) == 16
    save(model, tmp_path / "again")
    assert fingerprint(tmp_path / "again") == f  # same contents, another directory
    cfg = json.loads((saved / "config.json").read_text())
    cfg["eos_token_id"] = [2, 11]
    (saved / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(saved) != f
    # A retrain of the same shapes: same header, other values (tests/model/test_fingerprint.py has the cache's cases).
    with torch.no_grad():
        retrained = random_model(seed=42)
    save(retrained, tmp_path / "retrained")
    (tmp_path / "retrained" / "config.json").write_bytes((tmp_path / "again" / "config.json").read_bytes())
    assert fingerprint(tmp_path / "retrained") != f


def test_nothing_in_the_directory_is_executed(model, saved, tmp_path):
    marker = tmp_path / "executed"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    (saved / "modeling_evil.py").write_text(code)
    (saved / "tokenizer_evil.py").write_text(code)
    cfg = json.loads((saved / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil", "AutoTokenizer": ["tokenizer_evil.T", None]}
    (saved / "config.json").write_text(json.dumps(cfg))
    assert_same_model(model, load_model(saved))
    with pytest.raises(CheckpointError):
        load_tokenizer(saved)  # no tokenizer files here
    assert not marker.exists()


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<mask>": 3, "hi": 4}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(str(tmp_path))
    assert load_tokenizer(tmp_path)("hi hi")["input_ids"] == [4, 4]
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# bad checkpoints: one CheckpointError each, with a one-line message that names the problem
# ------------------------------------------------------------------------------------------------


def _drop_key(d):
    rewrite(d / "model.safetensors", lambda t: t.pop("context_tower.layers.0.mixer.D"))


def _extra_key(d):
    rewrite(d / "model.safetensors", lambda t: t.update({"context_tower.layers.0.mixer.foo": torch.zeros(2)}))


def _bad_shape(d):
    rewrite(d / "model.safetensors", lambda t: t.update({"t_block.1.weight": torch.zeros(5, 7)}))


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _shard_gone(d):
    (d / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _shard_escape(d):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../model.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _pickle_only(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def _bad_pattern(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["hybrid_override_pattern"] = "M*E"
    (d / "config.json").write_text(json.dumps(cfg))


def _config_value(key, value):
    def damage(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))

    return damage


BAD = {
    "missing directory": (lambda d: d.rename(d.with_name("moved")), "checkpoint directory not found"),
    "a file, not a directory": (lambda d: (shutil.rmtree(d), d.write_text("{}")), "not a directory"),
    "missing config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "bad JSON": (lambda d: (d / "config.json").write_text("{not json"), "bad config.json"),
    "invalid config": (_bad_pattern, "hybrid_override_pattern has 3 layers"),
    "zero kv heads": (_config_value("num_key_value_heads", 0), "bad config.json"),
    "fractional size": (_config_value("hidden_size", 3.5), "describes no buildable model"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no weights in"),
    "pickle only": (_pickle_only, "pickle checkpoints"),
    "missing shard": (_shard_gone, "references missing shard model-00002-of-00002.safetensors"),
    "shard outside the directory": (_shard_escape, "invalid shard name"),
    "bad index": (lambda d: (d / "model.safetensors.index.json").write_text("[1"), "unreadable index"),
    "missing key": (_drop_key, "missing 1 weights: context_tower.layers.0.mixer.D"),
    "unexpected key": (_extra_key, "1 unexpected weights: context_tower.layers.0.mixer.foo"),
    "shape mismatch": (_bad_shape, "shape mismatch for t_block.1.weight in model.safetensors: "
                                   "expected (192, 64), got (5, 7)"),
    "truncated file": (_truncate, "corrupt safetensors file"),
    "garbage file": (lambda d: (d / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"garbage!"),
                     "corrupt safetensors file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_errors(saved, case):
    damage, expected = BAD[case]
    damage(saved)
    with pytest.raises(CheckpointError) as err:
        load_model(saved)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg


def test_missing_keys_message_lists_a_few_and_the_count(saved):
    rewrite(saved / "model.safetensors", lambda t: [t.pop(k) for k in list(t) if k.startswith("t_block.")
                                                    or k.startswith("lm_head") or k.startswith("t_embedder.")])
    with pytest.raises(CheckpointError, match=r"missing 7 weights: lm_head.weight, t_block.1.bias, "
                                              r"t_block.1.weight, \.\.\. \(7 in all\)"):
        load_model(saved)


# ------------------------------------------------------------------------------------------------
# twotower info
# ------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_info_on_a_checkpoint(model, saved):
    r = runner.invoke(app, ["info", str(saved), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    counts = model.config.param_counts()
    assert info["params_per_tower"] == sum(p.numel() for n, p in model.named_parameters()
                                           if n.startswith(("context_tower.", "context_lm_head.")))
    assert info["params_per_tower"] == counts["params_per_tower"]
    assert info["params_total"] == sum(p.numel() for p in model.parameters()) == counts["params_total"]
    assert info["active_params_per_token"] == counts["active_params_per_token"]
    assert info["pattern"] == "M*EM-E" and info["ar_only"] is False and info["dtype"] == "float32"
    assert info["layer_counts"] == {"mamba": 2, "attention": 1, "moe": 2, "mlp": 1}
    assert info["fingerprint"] == fingerprint(saved)
    r = runner.invoke(app, ["info", str(saved)])
    assert r.exit_code == 0 and "params per tower" in r.stdout and "M*EM-E" in r.stdout


def test_info_on_an_ar_only_checkpoint(tmp_path):
    ar = random_model(tiny_cfg(), seed=46, ar_only=True)
    save(ar, tmp_path / "ar")
    info = json.loads(runner.invoke(app, ["info", str(tmp_path / "ar"), "--json"]).stdout)
    assert info["ar_only"] is True and info["params_total"] == info["params_per_tower"]
    assert info["params_per_tower"] == sum(p.numel() for p in ar.parameters())


def test_info_on_the_30b_preset_allocates_nothing(monkeypatch):
    import twotower_cli.commands.info as info_cmd

    def no_loading(*a, **k):
        raise AssertionError("the preset path must not build a model")

    monkeypatch.setattr(info_cmd, "load_model", no_loading)
    r = runner.invoke(app, ["info", "--preset", "nemotron-3-nano-30b-a3b", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert abs(info["params_per_tower"] / 31.6e9 - 1) < 0.01
    assert abs(info["active_params_per_token"] / 3.2e9 - 1) < 0.03
    assert info["pattern"].count("*") == 6 and info["dtype"] == "bfloat16" and info["hidden_size"] == 2688
    assert abs(info["params_total"] / 63.2e9 - 1) < 0.01


@pytest.mark.parametrize("args", [["info", "/no/such/checkpoint"], ["info", "--preset", "gpt-9"],
                                  ["info", "PATH", "--preset", "tiny"]])
def test_info_errors_are_one_line_exit_2(args, saved):
    args = [str(saved) if a == "PATH" else a for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.slow  # a subprocess
def test_info_bad_checkpoint_in_a_real_process(saved):
    _truncate(saved)
    p = subprocess.run([sys.executable, "-m", "twotower_cli", "info", str(saved)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error: corrupt safetensors file"), p.stderr
