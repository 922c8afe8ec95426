"""``spec_from_hf``: a Hugging Face checkpoint's ``config.json`` -> a validated :class:`VLMSpec`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import PluginError, SourceNotFoundError, SpecError, VlmkitError
from .hub import read_json, resolve_source
from .spec import VLMSpec, validate_spec

__all__ = ["spec_from_hf", "resolve_config_folder", "BUNDLED"]

log = logging.getLogger(__name__)

_DATA = Path(__file__).parent / "data" / "hf-configs"
#: Hub repo ids whose config/tokenizer files ship inside vlmkit (no weights).
BUNDLED = {
    "HuggingFaceTB/SmolVLM-256M-Instruct": _DATA / "SmolVLM-256M-Instruct",
    "HuggingFaceTB/SmolVLM-500M-Instruct": _DATA / "SmolVLM-500M-Instruct",
    "HuggingFaceTB/SmolVLM2-256M-Video-Instruct": _DATA / "SmolVLM2-256M-Video-Instruct",
    "HuggingFaceTB/SmolVLM2-500M-Video-Instruct": _DATA / "SmolVLM2-500M-Video-Instruct",
}

# HF config section for each slot, so errors name the key the user can find in config.json.
_HF_SECTION = {"vision_tower": "vision_config", "backbone": "text_config", "connector": "", "packer": "", "aligner": ""}


def resolve_config_folder(source: str | os.PathLike, *, weights: bool = False) -> tuple[Path, bool]:
    """The folder with ``source``'s files, and whether it is vlmkit's bundled copy.

    Falls back to the bundled SmolVLM config files (and logs a warning saying so) when a bundled
    repo id cannot be fetched and no weights are needed.
    """
    try:
        return resolve_source(source, weights=weights), False
    except SourceNotFoundError:
        bundled = BUNDLED.get(source) if isinstance(source, str) else None
        if bundled is None or weights:
            raise
        log.warning(
            "could not download %s (offline?); using the config files bundled with vlmkit (no weights)", source
        )
        return bundled, True


def spec_from_hf(source: str | os.PathLike) -> VLMSpec:
    """Derive the spec of a Hugging Face checkpoint (folder or Hub repo id).

    The ``model_type`` is answered by the first plugin whose ``vlmkit_spec_from_hf`` hook returns
    a spec; the result's ``weights`` and ``tokenizer`` point back at ``source``.
    """
    folder, _ = resolve_config_folder(source)
    config_path = str(folder / "config.json")
    config = read_json(folder, "config.json")
    data = _ask_plugins(config, folder, config_path)
    data = dict(data)
    data.setdefault("weights", os.fspath(source))
    data.setdefault("tokenizer", os.fspath(source))
    try:
        return validate_spec(data, source=config_path)
    except SpecError as exc:
        raise _hf_key_path(exc, config_path) from None


def _ask_plugins(config: dict, folder: Path, config_path: str) -> dict:
    """The YAML-form spec the first plugin that knows ``model_type`` answers."""
    from .plugins import get_plugin_manager

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise SpecError(
            f"expected a model type name (a string such as 'idefics3'), got {model_type!r}",
            key_path="model_type", source=config_path,
            hint="a Hugging Face config.json names its architecture in model_type; restore it from the checkpoint",
        )
    try:
        data = get_plugin_manager().hook.vlmkit_spec_from_hf(config=config, folder=folder)
    except VlmkitError:
        raise
    except Exception as exc:  # a plugin that choked on an odd value: still the config's fault
        raise SpecError(
            f"could not read this {model_type!r} config ({type(exc).__name__}: {exc})",
            source=config_path, hint="a value in config.json has an unexpected type or shape; compare it with the published one",
        ) from exc
    if data is None:
        raise SpecError(
            f"no installed plugin knows model_type {model_type!r}",
            key_path="model_type", source=config_path,
            hint="vlmkit knows idefics3 and smolvlm; install a plugin for this family or write a YAML spec",
        )
    if not isinstance(data, dict):
        raise PluginError(f"the plugin answering model_type {model_type!r} returned {type(data).__name__}, not a spec mapping")
    return data


def _hf_key_path(exc: SpecError, source: str) -> SpecError:
    """Rewrite ``backbone.hidden_size`` as ``text_config.hidden_size`` etc."""
    path = exc.key_path or ""
    slot, _, rest = path.partition(".")
    if slot in _HF_SECTION:
        section = _HF_SECTION[slot]
        path = (f"{section}.{rest}" if section else rest) if rest else (section or path)
    return SpecError(exc.detail, key_path=path or None, source=source, hint=exc.hint)
