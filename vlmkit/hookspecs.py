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

from typing import TYPE_CHECKING

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
    A model family (how a family's ``config.json`` maps to a spec and back, its prompt layout
    of images, its stop tokens; see :mod:`vlmkit.family`) is added with
    ``registry.add_family(family)``. A name (or ``model_type``) another plugin already
    registered raises :class:`vlmkit.errors.PluginError`.
    """
