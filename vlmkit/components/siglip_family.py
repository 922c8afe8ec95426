"""Model family ``siglip`` / ``siglip_vision_model``: SigLIP checkpoints as the weights of a
vision tower slot (no whole VLM is made from them, so ``spec_from_hf`` refuses these folders).

Published ``SiglipModel`` files and transformers 4.x ``SiglipVisionModel`` saves keep the tower
under ``vision_model.``; transformers 5 saves a bare ``SiglipVisionModel`` without it. The file
being read decides.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..family import Family
from ..hookspecs import hookimpl
from ..keymap import KeyMap

__all__ = ["SiglipFamily"]

PREFIX = "vision_model."


class SiglipFamily(Family):
    """Where SigLIP checkpoints keep the vision tower's tensors."""

    name = "siglip"
    model_types = ("siglip", "siglip_vision_model")
    sections = {"vision_tower": "vision_config"}
    prefixes = {"vision_tower": PREFIX}

    def key_map(self, slot: str, keymap: KeyMap, checkpoint_keys: Collection[str] = ()) -> KeyMap:
        if slot == "vision_tower" and checkpoint_keys and not any(k.startswith(PREFIX) for k in checkpoint_keys):
            return keymap  # a transformers 5 SiglipVisionModel file: the tower's own names
        return super().key_map(slot, keymap, checkpoint_keys)

    def spec_from_config(self, config: dict[str, Any], folder: Path | None, source: str) -> dict[str, Any]:
        raise SpecError(
            "a SigLIP checkpoint holds a vision tower (and a text encoder), not a vision-language model",
            key_path="model_type", source=source,
            hint="use it as one slot's weights in a model YAML: vision_tower: {name: siglip, ...}, "
            "weights: {vision_tower: <this folder>}",
        )


@hookimpl
def vlmkit_register_components(registry) -> None:  # noqa: ANN001 - pluggy passes the Registry
    """Register the :class:`SiglipFamily`."""
    registry.add_family(SiglipFamily())
