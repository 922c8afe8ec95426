"""``hidden_align``: the default aligner -- maps connector width ``D_c`` to the text width ``D``.

Identity (no parameters) when the widths match -- the case for every Idefics3 / SmolVLM
checkpoint, whose connector already projects to the text width -- otherwise a bias-free
``Linear(D_c, D)``.

Checkpoint key (only when it has a weight): ``model.aligner.proj.weight``. No Hugging Face model
class has this tensor, so ``save_pretrained`` (which writes transformers' Idefics3 layout) only
exports models whose aligner is the identity; a trained projection is loaded from, and kept in,
vlmkit's own layout (``weights: {aligner: folder}``).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..hookspecs import hookimpl
from ..keymap import KeyMap

__all__ = ["HiddenAlignParams", "HiddenAlign"]


class HiddenAlignParams(BaseModel):
    """No settings: the widths come from the neighbouring components."""

    model_config = ConfigDict(extra="forbid")


class HiddenAlign(nn.Module):
    """Visual tokens ``(N, K, in_features)`` -> ``(N, K, out_features)``."""

    Params = HiddenAlignParams

    def __init__(self, params: HiddenAlignParams, *, in_features: int, out_features: int) -> None:
        super().__init__()
        self.params = params
        self.in_features = in_features
        self.out_features = out_features
        self.proj = None if in_features == out_features else nn.Linear(in_features, out_features, bias=False)

    @property
    def is_identity(self) -> bool:
        """True when the widths match and the aligner has no parameters."""
        return self.proj is None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, K, D_c) -> (N, K, D)`` (the input itself when ``D_c == D``)."""
        return tokens if self.proj is None else self.proj(tokens)

    def key_map(self) -> KeyMap:
        """Empty for the identity; else ``proj.weight`` under its own name (the family places it)."""
        return KeyMap.prefixed(self.state_dict().keys(), "")


@hookimpl
def vlmkit_register_components(registry) -> None:  # noqa: ANN001 - pluggy passes the Registry
    """Register :class:`HiddenAlign` as aligner ``hidden_align``."""
    registry.add_aligner("hidden_align", HiddenAlign)
