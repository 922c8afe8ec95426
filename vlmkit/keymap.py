"""Declarative weight-name maps: one per component, used for loading and (inverted) for export.

A :class:`KeyRule` says which checkpoint tensors make one ``state_dict`` entry. Most rules are
one-to-one renames; a rule with several sources concatenates them along dim 0 at load time
(fused QKV or gate/up projections) and splits them back on export, by the sources' row counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

__all__ = ["KeyRule", "KeyMap"]


@dataclass(frozen=True)
class KeyRule:
    """``local`` state_dict key <- checkpoint ``sources`` (concatenated on dim 0, split by ``rows``)."""

    local: str
    sources: tuple[str, ...]
    rows: tuple[int, ...] | None = None  # row count of each source when fused

    def __post_init__(self) -> None:
        if len(self.sources) > 1 and (self.rows is None or len(self.rows) != len(self.sources)):
            raise ValueError(f"fused rule {self.local!r} needs one row count per source")


class KeyMap:
    """An ordered, invertible set of :class:`KeyRule` for one component."""

    def __init__(self, rules: Iterable[KeyRule]) -> None:
        self.rules = list(rules)
        self._by_local = {r.local: r for r in self.rules}
        if len(self._by_local) != len(self.rules):
            raise ValueError("duplicate local keys in key map")

    @classmethod
    def prefixed(cls, local_keys: Iterable[str], prefix: str, renames: Mapping[str, str] | None = None) -> KeyMap:
        """One-to-one rules ``local -> prefix + (renames.get(local) or local)``."""
        renames = renames or {}
        return cls(KeyRule(k, (prefix + renames.get(k, k),)) for k in local_keys)

    def __iter__(self) -> Iterator[KeyRule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap([*self.rules, *other.rules])

    def with_prefixes(self, prefixes: str | Mapping[str, str]) -> KeyMap:
        """The same rules with every checkpoint key re-prefixed: ``prefixes`` maps a leading part of
        the component's own names to where it lives in a checkpoint (longest match wins; ``""``
        matches everything), or is one prefix for every key. Used by model families, which own
        their checkpoints' layouts; components emit prefix-free names."""
        table = {"": prefixes} if isinstance(prefixes, str) else dict(prefixes)
        order = sorted(table, key=len, reverse=True)

        def place(key: str) -> str:
            for head in order:
                if key.startswith(head):
                    return table[head] + key[len(head) :]
            return key

        return KeyMap(KeyRule(r.local, tuple(place(s) for s in r.sources), r.rows) for r in self.rules)

    def checkpoint_keys(self) -> list[str]:
        """Every checkpoint key this map reads."""
        return [s for r in self.rules for s in r.sources]

    def export(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Invert the map: ``state_dict`` -> checkpoint-named tensors (fused ones split)."""
        out: dict[str, torch.Tensor] = {}
        for rule in self.rules:
            tensor = state_dict[rule.local]
            if len(rule.sources) == 1:
                out[rule.sources[0]] = tensor
            else:
                for name, part in zip(rule.sources, torch.split(tensor, list(rule.rows), dim=0)):
                    out[name] = part
        return out
