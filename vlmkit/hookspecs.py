"""The hooks a vlmkit plugin can implement.

A plugin is a module (or object) with functions decorated by :data:`vlmkit.hookimpl`. Built-in
components are plugins too: each component module in :mod:`vlmkit.components` implements
:func:`vlmkit_register_components` exactly as a third-party package does (``llama_layers`` only
holds building blocks of ``llama`` and is no plugin). Third-party packages are found through
the ``vlmkit`` entry-point group::

    [project.entry-points.vlmkit]
    my_tower = "my_package.plugin"
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .registry import Registry

PROJECT = "vlmkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def vlmkit_register_components(registry: Registry) -> None:
    """Add components to ``registry``.

    Call ``registry.add_vision_tower(name, cls)``, ``add_connector``, ``add_aligner``,
    ``add_packer`` or ``add_backbone`` once per component. ``cls`` is an ``nn.Module`` subclass
    with a pydantic ``Params`` class and a ``key_map()`` method (see :mod:`vlmkit.protocols`).
    A name another plugin already registered raises :class:`vlmkit.errors.PluginError`.
    """


@hookspec(firstresult=True)
def vlmkit_spec_from_hf(config: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    """Turn a Hugging Face ``config.json`` into a vlmkit spec, or return ``None``.

    ``config`` is the parsed ``config.json``; ``folder`` holds the checkpoint's other files
    (processor_config.json, generation_config.json...) for cross-checks. Return a mapping with
    the five slot keys, each ``{"name": registry_name, **params}`` (the YAML form), when this
    plugin knows ``config["model_type"]``; otherwise ``None``. The first non-``None`` answer wins,
    so a plugin can teach vlmkit a new model family.
    """


@hookspec(firstresult=True)
def vlmkit_hf_config_from_spec(spec: Any) -> dict[str, Any] | None:
    """The Hugging Face ``config.json`` for a :class:`~vlmkit.spec.VLMSpec`, or ``None``.

    Used by ``save_pretrained`` so a model assembled in vlmkit can be loaded by transformers
    (and engines that read HF checkpoints). Answer only for slot combinations your family's
    transformers class can represent.
    """
