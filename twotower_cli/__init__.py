"""twotower_cli: batch synthetic-data generation with TwoTower block-diffusion language models.

The public names load lazily (PEP 562): `import twotower_cli` and `twotower --help` stay free of
torch; the model modules are imported on first use of a name that lives in them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

try:
    __version__ = _version("twotower-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# public name -> module it lives in
_LAZY: dict[str, str] = {
    "ConfigError": ".config",
    "DecodeParams": ".config",
    "ModelConfig": ".config",
    "CheckpointError": ".model.checkpoint",
    "place_towers_on_devices": ".model.checkpoint",
    "save_pretrained": ".model.checkpoint",
    "load_tokenizer": ".model.tokenizer",
    "TowerState": ".model.twotower",
    "TwoTower": ".model.twotower",
    "TwoTowerForGeneration": ".engine.generation",  # the model with the release's generate_* API
    "load_model": ".engine.generation",  # returns a TwoTowerForGeneration
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DecodeParams",
    "ModelConfig",
    "TowerState",
    "TwoTower",
    "TwoTowerForGeneration",
    "__version__",
    "load_model",
    "load_tokenizer",
    "place_towers_on_devices",
    "save_pretrained",
]

def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs only; never executed
    from .config import ConfigError, DecodeParams, ModelConfig
    from .engine.generation import TwoTowerForGeneration, load_model
    from .model.checkpoint import CheckpointError, place_towers_on_devices, save_pretrained
    from .model.tokenizer import load_tokenizer
    from .model.twotower import TowerState, TwoTower
