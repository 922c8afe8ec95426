"""vlmkit: assemble vision-language models from swappable, plugin-registered parts.

Imports are lazy: ``import vlmkit`` is cheap and never imports transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

__version__ = "0.1.0"

_EXPORTS = {
    "build": "vlmkit.builder",
    "build_from_hf": "vlmkit.builder",
    "spec_from_hf": "vlmkit.hf",
    "load_processor": "vlmkit.processor",
    "VLMSpec": "vlmkit.spec",
    "load_yaml": "vlmkit.spec",
    "dump_yaml": "vlmkit.spec",
    "json_schema": "vlmkit.spec",
    "VLM": "vlmkit.model",
    "save_hf": "vlmkit.export",
    "generate": "vlmkit.generation",
    "stream": "vlmkit.generation",
    "get_registry": "vlmkit.plugins",
    "register_plugin": "vlmkit.plugins",
    "TrainRecipe": "vlmkit.train",
}

__all__ = ["hookimpl", "errors", "train", "__version__", *_EXPORTS]  # train: the callable vlmkit.train package

if TYPE_CHECKING:
    from . import errors
    from .builder import build, build_from_hf
    from .export import save_hf
    from .generation import generate, stream
    from .hf import spec_from_hf
    from .model import VLM
    from .plugins import get_registry, register_plugin
    from .processor import load_processor
    from .spec import VLMSpec, dump_yaml, json_schema, load_yaml
    from .train import TrainRecipe


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if importlib.util.find_spec(f"vlmkit.{name}") is not None:  # a submodule: vlmkit.spec, vlmkit.errors...
            return importlib.import_module(f"vlmkit.{name}")
        raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
