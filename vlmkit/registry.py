"""The component registry: registry names -> component classes, per slot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import PluginError, UnknownComponentError
from .protocols import SLOTS

__all__ = ["Registry", "Entry", "FamilyEntry"]


@dataclass(frozen=True)
class Entry:
    """One registered component: its slot, registry name, class and the plugin that added it."""

    slot: str
    name: str
    cls: type
    plugin: str


@dataclass(frozen=True)
class FamilyEntry:
    """One registered model family and the plugin that added it."""

    family: Any
    plugin: str


class Registry:
    """Typed ``add_*`` methods for plugins; ``get(slot, name)`` for the builder.

    ``current_plugin`` is set by the plugin manager while a plugin's hook runs, so every entry
    records who added it.
    """

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {slot: {} for slot in SLOTS}
        self._families: dict[str, FamilyEntry] = {}  # model_type -> entry
        self.current_plugin = "<direct>"

    def add_family(self, family: Any) -> None:
        """Register a :class:`~vlmkit.family.Family` instance for each of its ``model_types``."""
        from .family import Family

        if not isinstance(family, Family) or not family.model_types:
            raise PluginError(
                f"plugin {self.current_plugin!r} registered {family!r} as a family; expected a vlmkit.family.Family "
                "instance with at least one model_type",
                hint="subclass vlmkit.family.Family, set model_types, and register an instance",
            )
        for model_type in family.model_types:
            existing = self._families.get(model_type)
            if existing is not None:
                raise PluginError(
                    f"model_type {model_type!r} is claimed by two families: {existing.family.name!r} "
                    f"(plugin {existing.plugin!r}) and {family.name!r} (plugin {self.current_plugin!r})",
                    hint="block one plugin with VLMKIT_BLOCK_PLUGINS",
                )
        for model_type in family.model_types:
            self._families[model_type] = FamilyEntry(family, self.current_plugin)

    def family(self, model_type: str) -> Any:
        """The family that reads ``model_type``, or ``None``."""
        entry = self._families.get(model_type)
        return None if entry is None else entry.family

    def families(self) -> list[Any]:
        """Every registered family, once each, in registration order."""
        return list({id(e.family): e.family for e in self._families.values()}.values())

    def model_types(self) -> list[str]:
        """Every ``model_type`` some family reads, sorted."""
        return sorted(self._families)

    def drop_plugin(self, plugin_name: str) -> None:
        """Forget every component and family ``plugin_name`` registered."""
        for slot_entries in self._entries.values():
            for key in [k for k, e in slot_entries.items() if e.plugin == plugin_name]:
                del slot_entries[key]
        for key in [k for k, e in self._families.items() if e.plugin == plugin_name]:
            del self._families[key]

    def add_vision_tower(self, name: str, cls: type) -> None:
        """Register a :class:`~vlmkit.protocols.VisionTower` class under ``name``."""
        self._add("vision_tower", name, cls)

    def add_connector(self, name: str, cls: type) -> None:
        """Register a :class:`~vlmkit.protocols.Connector` class under ``name``."""
        self._add("connector", name, cls)

    def add_aligner(self, name: str, cls: type) -> None:
        """Register an :class:`~vlmkit.protocols.Aligner` class under ``name``."""
        self._add("aligner", name, cls)

    def add_packer(self, name: str, cls: type) -> None:
        """Register a :class:`~vlmkit.protocols.Packer` class under ``name``."""
        self._add("packer", name, cls)

    def add_backbone(self, name: str, cls: type) -> None:
        """Register a :class:`~vlmkit.protocols.Backbone` class under ``name``."""
        self._add("backbone", name, cls)

    def _add(self, slot: str, name: str, cls: type) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {self.current_plugin!r} registered a {slot} with an empty or non-string name {name!r}")
        params = getattr(cls, "Params", None)
        if params is None or not hasattr(params, "model_validate") or not callable(getattr(cls, "key_map", None)):
            raise PluginError(
                f"plugin {self.current_plugin!r}: {slot} {name!r} ({cls!r}) lacks a pydantic `Params` class "
                "or a `key_map()` method",
                hint="see docs/writing-plugins.md for what a component class needs",
            )
        existing = self._entries[slot].get(name)
        if existing is not None:
            raise PluginError(
                f"{slot} name {name!r} is registered twice: by {existing.plugin!r} and by {self.current_plugin!r}",
                hint="rename one of them, or block one plugin with VLMKIT_BLOCK_PLUGINS",
            )
        self._entries[slot][name] = Entry(slot, name, cls, self.current_plugin)

    def get(self, slot: str, name: str) -> Entry:
        """The entry for ``name`` in ``slot``; :class:`UnknownComponentError` lists the choices."""
        if slot not in self._entries:
            raise UnknownComponentError("slot", slot, SLOTS)
        try:
            return self._entries[slot][name]
        except (KeyError, TypeError):
            raise UnknownComponentError(slot.replace("_", " "), str(name), self._entries[slot]) from None

    def names(self, slot: str) -> list[str]:
        """Registered names for ``slot``, sorted."""
        return sorted(self._entries[slot])

    def entries(self) -> list[Entry]:
        """Every entry, in slot order then name order."""
        return [self._entries[s][n] for s in SLOTS for n in sorted(self._entries[s])]
