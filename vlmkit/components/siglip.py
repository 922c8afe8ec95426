"""``siglip``: the fixed-resolution SigLIP vision tower (transformers' ``SiglipVisionModel``).

Returns ``last_hidden_state`` (after ``post_layernorm``) -- the patch features a VLM consumes.
The attention-pooling head is not built: a VLM never uses the pooled vector, so HF's
``vision_use_head`` is not a parameter here (drop it, and the ``head.*`` weights, when converting a
SigLIP config; :meth:`SiglipVisionTower.key_map` simply does not ask for them).

Inputs whose size differs from ``image_size`` get bicubically interpolated position embeddings,
as transformers' ``interpolate_pos_encoding=True`` (in float32, then cast back).

The encoder is :mod:`vlmkit.components.navit`'s (one source of truth for the layer code).

Key map: prefix-free ``embeddings.patch_embedding.*``, ``embeddings.position_embedding.weight``,
``encoder.layers.{i}.*``, ``post_layernorm.*``. Where they live is the checkpoint family's
decision: ``model.vision_model.`` in Idefics3 files, ``vision_model.`` in published SigLIP
checkpoints (``SiglipModel``, transformers 4.x ``SiglipVisionModel``), no prefix in a bare
``SiglipVisionModel`` saved by transformers 5 (:mod:`vlmkit.components.siglip_family`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..hookspecs import hookimpl
from ..keymap import KeyMap
from ..protocols import TowerGeometry
from .navit import (
    VisionParams,
    add_patch_embeddings,
    attention_mask_from_patches,
    build_siglip_style,
    check_patch_mask,
    siglip_geometry,
)

__all__ = ["SiglipParams", "SiglipEmbeddings", "SiglipVisionTower", "interpolate_positions"]


class SiglipParams(VisionParams):
    """``SiglipVisionConfig`` fields with transformers' defaults (``vision_use_head`` omitted)."""

    hidden_size: int = Field(768, gt=0, description="Vision width D_v.")
    num_attention_heads: int = Field(12, gt=0, description="Attention heads; must divide hidden_size.")
    patch_size: int = Field(16, gt=0, description="Square patch side (pixels); the grid is image_size // patch_size.")


def interpolate_positions(table: torch.Tensor, side: int, grid: tuple[int, int]) -> torch.Tensor:
    """Position table ``(side*side, D)`` -> ``(1, gh*gw, D)`` for a ``(gh, gw)`` patch grid.

    The native grid returns the table itself; any other grid is bicubic-resized
    (``align_corners=False``), as transformers' ``SiglipVisionEmbeddings.interpolate_pos_encoding``.
    """
    if grid == (side, side):
        return table[None]
    dim = table.shape[-1]
    square = table.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(table.dtype)


class SiglipEmbeddings(nn.Module):
    """Patch embedding (strided conv) plus (interpolated) learned position embedding."""

    def __init__(self, params: SiglipParams) -> None:
        super().__init__()
        add_patch_embeddings(self, params)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, (H/p)(W/p), D)``."""
        grid = (pixel_values.shape[2] // self.patch_size, pixel_values.shape[3] // self.patch_size)
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return patches + interpolate_positions(self.position_embedding.weight, self.num_patches_per_side, grid)


class SiglipVisionTower(nn.Module):
    """Fixed-resolution SigLIP: pixels ``(N, C, H, W)`` -> ``(N, (H/p)(W/p), D_v)``.

    ``H = W = image_size`` reproduces ``SiglipVisionModel``; other sizes (multiples of
    ``patch_size``) interpolate the position table. ``patch_attention_mask`` (bool
    ``(N, H/p, W/p)``) is an extension transformers' SigLIP does not have: when given and not all
    True, padded patches are hidden from attention as keys (``None`` = plain SigLIP).
    """

    Params = SiglipParams

    def __init__(self, params: SiglipParams) -> None:
        super().__init__()
        build_siglip_style(self, params, SiglipEmbeddings(params))

    @classmethod
    def geometry(cls, params: SiglipParams) -> TowerGeometry:
        """The declared facts (:class:`vlmkit.protocols.DeclaresGeometry`): the square patch grid."""
        return siglip_geometry(params)

    def forward(
        self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(N, C, H, W)`` float, optional bool ``(N, H/p, W/p)`` -> ``(N, (H/p)(W/p), D_v)``."""
        pixel_values = pixel_values.to(self.embeddings.patch_embedding.weight.dtype)
        attn_mask = None
        if patch_attention_mask is not None:
            mask = check_patch_mask(patch_attention_mask, pixel_values, self.patch_size)
            attn_mask = attention_mask_from_patches(mask)
        hidden = self.encoder(self.embeddings(pixel_values), attn_mask)
        return self.post_layernorm(hidden)

    def key_map(self) -> KeyMap:
        """Every state_dict key under its own (transformers ``SiglipVisionTransformer``) name; the
        family of the checkpoint read places them (e.g. ``vision_model.`` in SigLIP files)."""
        return KeyMap.prefixed(self.state_dict().keys(), "")


@hookimpl
def vlmkit_register_components(registry) -> None:  # noqa: ANN001 - pluggy passes the Registry
    """Register :class:`SiglipVisionTower` as vision tower ``siglip``."""
    registry.add_vision_tower("siglip", SiglipVisionTower)
