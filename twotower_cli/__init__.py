"""twotower_cli: batch synthetic-data generation with TwoTower block-diffusion language models."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .config import ConfigError, DecodeParams, ModelConfig
from .model.checkpoint import CheckpointError, load_model, place_towers_on_devices, save_pretrained
from .model.tokenizer import load_tokenizer
from .model.twotower import TowerState, TwoTower

try:
    __version__ = _version("twotower-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# `model.save_pretrained(dir)` reads like transformers; the implementation lives in checkpoint.py.
TwoTower.save_pretrained = save_pretrained

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DecodeParams",
    "ModelConfig",
    "TowerState",
    "TwoTower",
    "__version__",
    "load_model",
    "load_tokenizer",
    "place_towers_on_devices",
    "save_pretrained",
]
