"""Configuration dataclasses that check themselves.

`ModelConfig` uses the checkpoint's own NemotronH field names so that a released `config.json`
loads without translation. `DecodeParams` holds one row's decoding settings (SPEC.md §5).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

LAYER_KINDS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
MODES = ("diffusion", "mock-ar", "ar", "speculative")
# DecodeParams' bounds (the one place ranges live; README's decoding section lists them).
MAX_TEMPERATURE = 100.0  # far beyond any useful value; keeps logits / T finite in float32
MAX_NEW_TOKENS = 1 << 20  # also checked against the model's context by the batcher
MAX_BLOCK_SIZE = 1024
MAX_STEPS_PER_BLOCK = 1024
SEED_LIMIT = 1 << 63  # seeds are torch int64
MAX_TOKEN_ID = (1 << 31) - 1  # the vocabulary itself is checked when the model loads
MAX_SAMPLES = 1024  # n: samples per prompt
MAX_STOPS = 16  # stop strings per row
MAX_STOP_CHARS = 256  # characters per stop string
MAX_TOP_K = 1 << 31


class ConfigError(UserError, ValueError):
    """A configuration that cannot describe a valid model or run (a `UserError`: exit 2, one line;
    still a `ValueError` for callers that catch that)."""


@dataclass
class ModelConfig:
    vocab_size: int = 131072
    hidden_size: int = 2688
    num_hidden_layers: int = 52
    hybrid_override_pattern: str = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False
    # mamba-2
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # moe / mlp
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    n_shared_experts: int = 1
    moe_shared_expert_intermediate_size: int = 3712
    intermediate_size: int = 1856
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # misc
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int = 1
    eos_token_id: int | list[int] = 2
    pad_token_id: int = 0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    rope_theta: float | None = None  # present in released configs, unused: the model is NoPE
    torch_dtype: str = "bfloat16"
    # Fields of config.json that we do not interpret, kept so that save_pretrained round-trips them.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        p = self.hybrid_override_pattern
        bad = sorted(set(p) - set(LAYER_KINDS))
        if bad:
            raise ConfigError(f"hybrid_override_pattern has unknown layer kinds {bad}; allowed: M * E -")
        if len(p) != self.num_hidden_layers:
            raise ConfigError(
                f"hybrid_override_pattern has {len(p)} layers but num_hidden_layers is {self.num_hidden_layers}"
            )
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "layer_norm_epsilon")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if "*" in p:
            for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
                if not getattr(self, name) > 0:
                    raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if "M" in p:
            for name in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups"):
                if not getattr(self, name) > 0:
                    raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
            if self.mamba_num_heads % self.n_groups:
                raise ConfigError("mamba_num_heads must be a multiple of n_groups")
            if self.conv_kernel < 2:
                raise ConfigError("conv_kernel must be at least 2")
        if "E" in p and not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError("num_experts_per_tok must be in 1..n_routed_experts")
        if self.mlp_hidden_act != "relu2":
            raise ConfigError(f"mlp_hidden_act {self.mlp_hidden_act!r} is not supported (only relu2)")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def layer_kinds(self) -> list[str]:
        return [LAYER_KINDS[c] for c in self.hybrid_override_pattern]

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return list(e) if isinstance(e, (list, tuple)) else [e]

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def nemotron_3_nano_30b_a3b(cls) -> ModelConfig:
        """The released per-tower values (SPEC.md §2 table)."""
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int = 256) -> ModelConfig:
        """A small config with every layer kind, for tests (the embedded model's own config is
        `training.train.tiny_model_config`, saved in its config.json)."""
        return cls(
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=6,
            hybrid_override_pattern="M*EM-E",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=2,
            conv_kernel=4,
            chunk_size=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            moe_shared_expert_intermediate_size=64,
            intermediate_size=128,
            max_position_embeddings=4096,
            torch_dtype="float32",
        )

    PRESETS = {"nemotron-3-nano-30b-a3b": "nemotron_3_nano_30b_a3b", "tiny": "tiny"}

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        key = name.replace("_", "-").lower()
        if key not in cls.PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(cls.PRESETS)}")
        return getattr(cls, cls.PRESETS[key])()

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        # transformers 5.x writes null for fields it derives (num_hidden_layers, torch_dtype, ...):
        # treat null as absent, and read its layer list `layers_block_type` as the pattern.
        d = {k: v for k, v in d.items() if v is not None}
        kinds = d.pop("layers_block_type", None)
        if isinstance(kinds, list) and "hybrid_override_pattern" not in d:
            chars = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*",
                     "moe": "E", "mlp": "-"}
            d["hybrid_override_pattern"] = "".join(chars.get(k, "?") for k in kinds)
            d.pop("num_hidden_layers", None)
        # Aliases used by some NemotronH configs.
        aliases = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_chunk_size": "chunk_size",
                   "mamba_conv_bias": "use_conv_bias", "dtype": "torch_dtype"}
        for a, b in aliases.items():
            if a in d and b not in d:
                d[b] = d.pop(a)
        if "hybrid_override_pattern" in d and "num_hidden_layers" not in d:
            d["num_hidden_layers"] = len(d["hybrid_override_pattern"])
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:  # wrong value types surface as TypeError in comparisons
            raise ConfigError(f"invalid config: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise ConfigError(f"no config.json in {p}")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"unreadable config {f}: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config {f} is not a JSON object")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = dict(self.extra)
        out.update(d)
        out.setdefault("model_type", "nemotron_h")
        return out

    # ---- parameter counts (no weights allocated) -------------------------------------------------
    def layer_params(self, kind: str, active: bool = False) -> int:
        H = self.hidden_size
        n = H  # the layer's pre-norm
        if kind == "mamba":
            proj = 2 * self.d_inner + 2 * self.n_groups * self.ssm_state_size + self.mamba_num_heads
            n += H * proj + (self.mamba_proj_bias and proj or 0)
            n += self.conv_dim * self.conv_kernel + (self.conv_dim if self.use_conv_bias else 0)
            n += 3 * self.mamba_num_heads + self.d_inner  # dt_bias, A_log, D, gated norm
            n += self.d_inner * H + (self.mamba_proj_bias and H or 0)
        elif kind == "attention":
            q = self.num_attention_heads * self.head_dim
            kv = self.num_key_value_heads * self.head_dim
            n += H * (q + 2 * kv) + q * H
            n += (q + 2 * kv + H) if self.attention_bias else 0
        elif kind == "moe":
            experts = self.num_experts_per_tok if active else self.n_routed_experts
            n += self.n_routed_experts * H + self.n_routed_experts  # router + correction bias
            n += experts * (2 * H * self.moe_intermediate_size + self._mlp_bias(self.moe_intermediate_size))
            shared = self.n_shared_experts * self.moe_shared_expert_intermediate_size
            n += 2 * H * shared + self._mlp_bias(shared)
        elif kind == "mlp":
            n += 2 * H * self.intermediate_size + self._mlp_bias(self.intermediate_size)
        return n

    def _mlp_bias(self, inner: int) -> int:
        return inner + self.hidden_size if self.mlp_bias else 0

    def param_counts(self) -> dict[str, int]:
        """Parameters per tower, both towers with the adaLN-single, and active per token.

        Active parameters exclude the input embedding (a lookup, not a matmul), the usual convention;
        the released card's "3.2B active" is counted that way.
        """
        H, V = self.hidden_size, self.vocab_size
        layers = sum(self.layer_params(k) for k in self.layer_kinds)
        active_layers = sum(self.layer_params(k, active=True) for k in self.layer_kinds)
        head = 0 if self.tie_word_embeddings else V * H
        tower = V * H + layers + H + head
        adaln = (256 * H + H) + (H * H + H) + (H * 3 * H + 3 * H) + self.num_hidden_layers * 3 * H
        active = active_layers + H + V * H
        return {
            "params_per_tower": tower,
            "params_adaln": adaln,
            "params_total": 2 * tower + adaln,
            "active_params_per_token": active,
            "active_params_per_token_with_embeddings": active + V * H,
        }


def _short(v: Any) -> str:
    """A value for an error message, cut short (a 10,000-digit integer or a nested object is one line)."""
    try:
        r = repr(v)
    except ValueError:  # an int of more than sys.get_int_max_str_digits() digits
        return f"an integer of {v.bit_length()} bits"
    return r if len(r) <= 40 else r[:37] + "..."


@dataclass
class DecodeParams:
    """How one row is decoded (SPEC.md §5). Every field may be overridden per row."""

    mode: str = "diffusion"
    gamma: float = 0.8  # confidence_threshold
    block_size: int = 16
    steps_per_block: int = 16
    temperature: float = 0.0
    max_new_tokens: int = 128
    seed: int = 0
    mask_token_id: int = 3
    # Sampling filters on the distribution a token is sampled from (temperature > 0 only; SPEC.md
    # §5): keep the top_k most likely (0: off), then the smallest nucleus of mass top_p (1: off),
    # then the tokens at least min_p times as likely as the most likely (0: off).
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()  # the completion ends before the first of these strings
    n: int = 1  # samples of this prompt, each its own output row (pipeline: sample_index)

    def __post_init__(self) -> None:
        # Every numeric field has a range that keeps the engine's arithmetic finite (a temperature
        # of 1e39 overflows the logits to inf/NaN and a block never completes; a seed of 2^63 does
        # not fit torch's int64). Per-row overrides go through these same checks (reader, batcher).
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("gamma", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {_short(v)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature > MAX_TEMPERATURE:
            raise ConfigError(f"temperature must be at most {MAX_TEMPERATURE:g}, got {self.temperature:g}")
        for name, most in (("block_size", MAX_BLOCK_SIZE), ("steps_per_block", MAX_STEPS_PER_BLOCK),
                           ("max_new_tokens", MAX_NEW_TOKENS)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {_short(v)}")
            if v > most:
                raise ConfigError(f"{name} must be at most {most}, got {_short(v)}")
        for name in ("seed", "mask_token_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {_short(v)}")
        if self.seed >= SEED_LIMIT:
            raise ConfigError(f"seed must fit in 64 bits: at most {SEED_LIMIT - 1}, got {_short(self.seed)}")
        if self.mask_token_id > MAX_TOKEN_ID:
            raise ConfigError(f"mask_token_id must be at most {MAX_TOKEN_ID}, got {_short(self.mask_token_id)}")
        self._check_sampling()

    def _check_sampling(self) -> None:
        for name, lo, hi, lo_open in (("top_p", 0.0, 1.0, True), ("min_p", 0.0, 1.0, False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {_short(v)}")
            if v > hi or v < lo or (lo_open and v == lo):
                raise ConfigError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}")
        for name, lo, most in (("top_k", 0, MAX_TOP_K), ("n", 1, MAX_SAMPLES)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {_short(v)}")
            if v > most:
                raise ConfigError(f"{name} must be at most {most}, got {_short(v)}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {_short(self.stop)}")
        self.stop = tuple(dict.fromkeys(self.stop))  # order kept, repeats dropped
        if len(self.stop) > MAX_STOPS:
            raise ConfigError(f"at most {MAX_STOPS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise ConfigError("a stop string must not be empty")
            if len(s) > MAX_STOP_CHARS:
                raise ConfigError(f"a stop string must be at most {MAX_STOP_CHARS} characters, got {len(s)}")
        if self.n > 1 and self.temperature == 0:
            raise ConfigError(f"n = {self.n} samples at temperature 0 would be identical: set a temperature > 0")

    @property
    def filters(self) -> bool:
        """Whether any sampling filter is on (they change nothing at temperature 0)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)

    def replace(self, **changes: Any) -> DecodeParams:
        return dataclasses.replace(self, **changes)
