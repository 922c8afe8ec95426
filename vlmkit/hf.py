"""``spec_from_hf``: a Hugging Face checkpoint's ``config.json`` -> a validated :class:`VLMSpec`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import PluginError, SourceNotFoundError, SpecError, VlmkitError
from .family import Family, bundled_folder, family_for_config
from .hub import read_json, resolve_source
from .spec import VLMSpec, validate_spec

__all__ = ["spec_from_hf", "resolve_config_folder", "family_of_folder"]

log = logging.getLogger(__name__)

def resolve_config_folder(source: str | os.PathLike, *, weights: bool = False) -> tuple[Path, bool]:
    """The folder with ``source``'s files, and whether it is vlmkit's bundled copy.

    Falls back to the config files a family bundles for that repo id (and logs a warning saying
    so) when it cannot be fetched and no weights are needed.
    """
    try:
        return resolve_source(source, weights=weights), False
    except SourceNotFoundError:
        bundled = bundled_folder(source) if isinstance(source, str) else None
        if bundled is None or weights:
            raise
        log.warning(
            "could not download %s (offline?); using the config files bundled with vlmkit (no weights)", source
        )
        return bundled, True


def spec_from_hf(source: str | os.PathLike) -> VLMSpec:
    """Derive the spec of a Hugging Face checkpoint (folder or Hub repo id).

    The family registered for ``config.json``'s ``model_type`` maps it to a spec; the result's
    ``weights`` and ``tokenizer`` point back at ``source``.
    """
    folder, _ = resolve_config_folder(source)
    config_path = str(folder / "config.json")
    config = read_json(folder, "config.json")
    family = _family(config, config_path)
    data = dict(_ask(family, config, folder, config_path))
    data.setdefault("weights", os.fspath(source))
    data.setdefault("tokenizer", os.fspath(source))
    try:
        return validate_spec(data, source=config_path)
    except SpecError as exc:
        raise family.config_error(exc, config_path) from None


def family_of_folder(folder: str | os.PathLike) -> Family | None:
    """The family of the checkpoint in ``folder`` (by its ``config.json``), or ``None``."""
    config = read_json(Path(folder), "config.json", required=False)
    return family_for_config(config if isinstance(config, dict) else None)


def _family(config: dict, config_path: str) -> Family:
    """The family that reads ``config``'s ``model_type``; a :class:`SpecError` lists the known ones."""
    from .plugins import get_registry

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise SpecError(
            f"expected a model type name (a string), got {model_type!r}",
            key_path="model_type", source=config_path,
            hint="a Hugging Face config.json names its architecture in model_type; restore it from the checkpoint",
        )
    family = family_for_config(config)
    if family is None:
        known = ", ".join(get_registry().model_types()) or "none"
        raise SpecError(
            f"no installed plugin knows model_type {model_type!r}",
            key_path="model_type", source=config_path,
            hint=f"installed families read: {known}; install a plugin for this family or write a YAML spec",
        )
    return family


def _ask(family: Family, config: dict, folder: Path, config_path: str) -> dict:
    """The YAML-form spec ``family`` makes of ``config``; a plugin's crash is the config's fault."""
    try:
        data = family.spec_from_config(config, folder, config_path)
    except VlmkitError:
        raise
    except Exception as exc:  # a family that choked on an odd value: still the config's fault
        raise SpecError(
            f"could not read this {config.get('model_type')!r} config ({type(exc).__name__}: {exc})",
            source=config_path, hint="a value in config.json has an unexpected type or shape; compare it with the published one",
        ) from exc
    if not isinstance(data, dict):
        raise PluginError(f"family {family.name!r} returned {type(data).__name__}, not a spec mapping")
    return data
