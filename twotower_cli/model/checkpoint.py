"""Checkpoints: config.json + safetensors (single file or sharded), key names of SPEC.md §4.

Weights come from safetensors only: nothing in a checkpoint directory is imported, executed or
unpickled. Loading builds the model on the `meta` device (no random weights), checks every key and
shape against the tensor headers before reading any data, then reads the tensors memory-mapped,
one at a time and tower by tower, straight to their target device and dtype.

Two layouts load:
  TwoTower   context_tower.* context_lm_head.weight denoiser_tower.* lm_head.weight t_embedder.*
             t_block.* scale_shift_tables.N   (without denoiser_tower.*: the context tower alone)
  NemotronH  backbone.* lm_head.weight  -> context_tower.* context_lm_head.weight, AR mode only
`embedding.` is accepted as an alias of `embeddings.` in both.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from .files import (  # noqa: F401  (re-exported: the checkpoint API in one place)
    ASSET_CHECKPOINT,
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    CheckpointError,
    checkpoint_dir,
    default_checkpoint,
    fingerprint,
    weight_files,
)
from .twotower import TwoTower

SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Keys some NemotronH checkpoints carry that no mode here uses (multi-token prediction heads).
IGNORED_PREFIXES = ("mtp.",)
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

DeviceLike = str | torch.device


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> ModelConfig:
    root = checkpoint_dir(path)
    try:
        return ModelConfig.from_pretrained(root)
    except (ConfigError, ValueError, TypeError, ArithmeticError, AttributeError) as e:
        # ConfigError for the checks ModelConfig makes; the others for values of a wrong type
        # or range that slip past them (e.g. num_key_value_heads = 0).
        raise CheckpointError(f"bad config.json in {root}: {_one_line(e)}") from None


def _open(file: Path, device: str = "cpu"):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device=device)
    except Exception as e:  # the Rust SafetensorError, OSError, ...
        raise CheckpointError(f"corrupt safetensors file {file}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _canonical(key: str, backbone: bool) -> str:
    """A checkpoint key -> our parameter name."""
    parts = key.split(".")
    if backbone:
        if parts[0] == "backbone":
            parts[0] = "context_tower"
        elif key == "lm_head.weight":
            return "context_lm_head.weight"
    if len(parts) > 2 and parts[0] in ("context_tower", "denoiser_tower") and parts[1] == "embedding":
        parts[1] = "embeddings"
    return ".".join(parts)


class _Entry:
    __slots__ = ("file", "key", "shape", "dtype")

    def __init__(self, file: Path, key: str, shape: tuple[int, ...], dtype: str):
        self.file, self.key, self.shape, self.dtype = file, key, shape, dtype


def _scan_headers(root: Path) -> tuple[dict[str, _Entry], bool]:
    """Every tensor's (file, key, shape, dtype) by our parameter name, without reading data.

    Returns (entries, ar_only)."""
    files, weight_map = weight_files(root)
    raw: dict[str, _Entry] = {}
    for file in files:
        with _open(file) as f:
            try:
                for key in f.keys():
                    sl = f.get_slice(key)
                    if key in raw:
                        other = raw[key].file.name
                        raise CheckpointError(f"weight {key} appears in both {other} and {file.name}")
                    raw[key] = _Entry(file, key, tuple(sl.get_shape()), str(sl.get_dtype()))
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"corrupt safetensors file {file}: {_one_line(e)}") from None
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in raw or raw[key].file.name != name:
                raise CheckpointError(f"index {root / INDEX_FILE} says {key} is in {name}, but it is not")
    raw = {k: e for k, e in raw.items() if not k.startswith(IGNORED_PREFIXES)}
    backbone = any(k.startswith("backbone.") for k in raw)
    backbone = backbone and not any(k.startswith("context_tower.") for k in raw)
    entries: dict[str, _Entry] = {}
    for key, e in raw.items():
        name = _canonical(key, backbone)
        if name in entries:
            raise CheckpointError(f"weights {entries[name].key} and {key} both map to {name}")
        entries[name] = e
    ar_only = backbone or not any(k.startswith("denoiser_tower.") for k in entries)
    return entries, ar_only


def _few(names: Iterable[str], n: int = 3) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _check_keys(model: TwoTower, entries: dict[str, _Entry], root: Path) -> None:
    params = dict(model.named_parameters())
    tied = set()
    if model.config.tie_word_embeddings:  # a tied head may be absent from the file
        tied = {"context_lm_head.weight", "lm_head.weight"}
    missing = [n for n in params if n not in entries and n not in tied]
    if missing:
        raise CheckpointError(f"checkpoint {root} is missing {len(missing)} weights: {_few(missing)}")
    unexpected = [entries[n].key for n in entries if n not in params]
    if unexpected:
        n = len(unexpected)
        raise CheckpointError(f"checkpoint {root} has {n} unexpected weights: {_few(unexpected)}")
    for name, e in entries.items():
        want = tuple(params[name].shape)
        if e.shape != want:
            where = f"{e.key} in {e.file.name}"
            raise CheckpointError(f"shape mismatch for {where}: expected {want}, got {e.shape}")
        if e.dtype not in FLOAT_DTYPES:
            where = f"{e.key} in {e.file.name}"
            raise CheckpointError(f"weight {where} has dtype {e.dtype}, expected floating point")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    """The weight dtype: as given; else the config's torch_dtype on CUDA and float32 elsewhere
    (bf16 matmuls are slow on CPU)."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        dtype = cfg.torch_dtype or "bfloat16"
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = names.get(str(dtype).lower(), str(dtype).lower()).removeprefix("torch.")
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise CheckpointError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    return d


def _param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The SSM constants and the router stay fp32 whatever the model dtype (as TwoTower.cast)."""
    keep = ".mixer." in name and any(name.endswith(k) for k in TwoTower.FP32_PARAMS)
    return torch.float32 if keep else dtype


def _is_context(name: str) -> bool:
    return name.startswith(("context_tower.", "context_lm_head."))


def load_model(
    path: str | os.PathLike,
    device: DeviceLike | tuple[DeviceLike, DeviceLike] | None = None,
    dtype: str | torch.dtype | None = None,
    cls: type[TwoTower] = TwoTower,
) -> TwoTower:
    """Load a checkpoint directory (SPEC.md §4) as a `cls` (a `TwoTower`; the engine layer passes its
    generation subclass).

    device: one device for everything (default "cpu"), or a pair (context device, denoiser device)
    so that each tower is read straight onto its own GPU. "meta" checks the checkpoint's keys and
    shapes and returns a model without data (e.g. to count parameters).
    dtype: see `resolve_dtype`. Raises `CheckpointError` with a one-line message.
    """
    root = checkpoint_dir(path)
    cfg = read_config(root)
    entries, ar_only = _scan_headers(root)
    try:
        with torch.device("meta"):
            model = cls(cfg, ar_only=ar_only, init=False)
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as e:
        raise CheckpointError(f"config.json in {root} describes no buildable model: {_one_line(e)}") from None
    _check_keys(model, entries, root)
    if isinstance(device, (tuple, list)):
        ctx_dev, den_dev = (torch.device(d) for d in device)
    else:
        ctx_dev = den_dev = torch.device(device if device is not None else "cpu")
    if ctx_dev.type == "meta" and den_dev.type == "meta":
        return model
    wdtype = resolve_dtype(dtype, ctx_dev if ctx_dev.type == "cuda" else den_dev, cfg)
    params = dict(model.named_parameters())
    # Tower by tower: the context tower first, so a two-GPU load fills one device, then the other.
    for group in (True, False):
        names = [n for n in entries if _is_context(n) == group]
        dev = ctx_dev if group else den_dev
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(entries[n].file, []).append(n)
        for file, file_names in by_file.items():
            # safetensors reads a CUDA target directly; CPU reads come from the memory map.
            with _open(file, str(dev) if dev.type == "cuda" else "cpu") as f:
                for n in file_names:
                    try:
                        t = f.get_tensor(entries[n].key)
                    except Exception as e:
                        raise CheckpointError(f"corrupt safetensors file {file}: {_one_line(e)}") from None
                    out = t.to(device=dev, dtype=_param_dtype(n, wdtype))
                    if out.data_ptr() == t.data_ptr() and dev.type == "cpu":
                        # Still a view of the file's memory map: copy this one tensor into owned,
                        # aligned memory (unaligned weights take other kernels and round
                        # differently; a file rewritten in place would fault under the map).
                        out = out.clone()
                    _assign(model, n, out, params[n].requires_grad)
                    del t, out
    if cfg.tie_word_embeddings:
        if "context_lm_head.weight" not in entries:
            model.context_lm_head.weight = model.context_tower.embeddings.weight
        if not ar_only and "lm_head.weight" not in entries:
            model.lm_head.weight = model.denoiser_tower.embeddings.weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # cannot happen after _check_keys; guards against a silent half-loaded model
        raise CheckpointError(f"checkpoint {root} left {len(left)} weights unloaded: {_few(left)}")
    return model.eval()


def _assign(model: nn.Module, name: str, t: torch.Tensor, requires_grad: bool) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[leaf] = nn.Parameter(t, requires_grad=requires_grad and t.is_floating_point())


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def save_pretrained(
    model: TwoTower, save_dir: str | os.PathLike, max_shard_size: int | None = None, tokenizer=None
) -> Path:
    """Write config.json and the weights under SPEC.md §4 key names.

    One `model.safetensors`, or with `max_shard_size` (bytes) shards of at most that size (a single
    larger tensor gets a shard of its own) plus `model.safetensors.index.json`. Files are written
    under temporary names and renamed into place; files of the other layout left by an earlier
    save are removed. `tokenizer` (optional) is saved beside the weights.
    """
    from safetensors.torch import save_file

    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if p.is_meta:
            raise CheckpointError("cannot save a model whose weights are on the meta device")
        tensors[name] = p.detach().to("cpu").contiguous()
    if max_shard_size is not None and max_shard_size <= 0:
        raise ValueError("max_shard_size must be a positive number of bytes")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_size is not None and shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    written: list[tuple[Path, Path]] = []  # (temporary, final)
    meta = {"format": "pt"}
    if max_shard_size is None:
        final = [out / SINGLE_FILE]
    else:
        final = [out / _shard_name(i + 1, len(shards)) for i in range(len(shards))]
    try:
        for shard, dst in zip(shards, final, strict=True):
            tmp = dst.with_name(dst.name + ".tmp")
            save_file(shard, str(tmp), metadata=meta)
            written.append((tmp, dst))
        if max_shard_size is not None:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {n: dst.name for shard, dst in zip(shards, final, strict=True) for n in shard},
            }
            text = json.dumps(index, indent=2, sort_keys=True)
            written.append((_write_tmp(out / INDEX_FILE, text), out / INDEX_FILE))
        cfg = model.config.to_dict()
        cfg["torch_dtype"] = str(model.context_tower.embeddings.weight.dtype).removeprefix("torch.")
        written.append((_write_tmp(out / "config.json", json.dumps(cfg, indent=2)), out / "config.json"))
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, dst in written:
        os.replace(tmp, dst)
    keep = {dst.name for _, dst in written}
    for f in out.iterdir():  # stale files of the other layout (or of a different shard count)
        if f.name not in keep and (f.name in (SINGLE_FILE, INDEX_FILE) or SHARD_RE.match(f.name)):
            f.unlink()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _write_tmp(dst: Path, text: str) -> Path:
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


# ------------------------------------------------------------------------------------------------
# Placement and identity
# ------------------------------------------------------------------------------------------------


def place_towers_on_devices(model: TwoTower, ctx_device: DeviceLike, den_device: DeviceLike) -> TwoTower:
    """Context tower + its head on `ctx_device`; denoiser tower, its head and the adaLN-single on
    `den_device` (SPEC.md §6: one tower per GPU). Moves in place and returns the model."""
    model.context_tower.to(ctx_device)
    model.context_lm_head.to(ctx_device)
    if not model.ar_only:
        den = (model.denoiser_tower, model.lm_head, model.t_embedder, model.t_block, model.scale_shift_tables)
        for m in den:
            m.to(den_device)
    return model


def weight_dtypes(path: str | os.PathLike) -> dict[str, int]:
    """Parameters stored per dtype ("bfloat16": n, ...), read from the headers only."""
    entries, _ = _scan_headers(checkpoint_dir(path))
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    out: dict[str, int] = {}
    for e in entries.values():
        n = 1
        for s in e.shape:
            n *= s
        key = names.get(e.dtype, e.dtype.lower())
        out[key] = out.get(key, 0) + n
    return out
