"""The component registry: registry names -> component classes, per slot."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PluginError, UnknownComponentError
from .protocols import SLOTS

__all__ = ["Registry", "Entry"]


@dataclass(frozen=True)
class Entry:
    """One registered component: its slot, registry name, class and the plugin that added it."""

    slot: str
    name: str
    cls: type
    plugin: str


class Registry:
    """Typed ``add_*`` methods for plugins; ``get(slot, name)`` for the builder.

    ``current_plugin`` is set by the plugin manager while a plugin's hook runs, so every entry
    records who added it.
    """

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {slot: {} for slot in SLOTS}
        self.current_plugin = "<direct>"

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
