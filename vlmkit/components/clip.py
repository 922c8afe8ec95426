"""``clip``: the CLIP vision tower as LLaVA uses it (transformers' ``CLIPVisionModel``).

Numerically the same as ``CLIPVisionModel`` followed by LLaVA's feature selection
(``LlavaModel.get_image_features``): a bias-free strided-conv patch embedding, a learned class
token, ``image_size // patch_size`` squared plus one learned position embeddings,
``pre_layrnorm``, a pre-norm encoder (:mod:`vlmkit.components.navit`'s layers), then

- ``vision_feature_layer`` picks ``hidden_states[i]`` (index ``0`` is the embeddings after
  ``pre_layrnorm``, ``i`` the output of encoder layer ``i``; negative indices count from the end,
  ``-1`` is the last layer). A list of indices concatenates those states on the feature axis.
- ``vision_feature_select_strategy``: ``"default"`` drops the class token, ``"full"`` keeps it
  (one more token per image).

``post_layernorm`` is never applied: LLaVA reads the encoder's hidden states, not
``last_hidden_state``'s pooled output. Layers after the deepest selected one are not computed.
Both still exist as modules, so a checkpoint's every tensor has a home and a strict load report
stays strict; their parameters are built with ``requires_grad=False`` (they cannot receive a
gradient) -- see :attr:`ClipVisionTower.inert_parameters`.

Inputs of another size than ``image_size`` (multiples of ``patch_size``) get bicubically
interpolated patch position embeddings, as transformers' ``interpolate_pos_encoding=True``.

Key map: prefix-free, the names inside transformers 5's ``CLIPVisionModel``:
``embeddings.class_embedding``, ``embeddings.patch_embedding.weight``,
``embeddings.position_embedding.weight``, ``pre_layrnorm.*``, ``encoder.layers.{i}.*``,
``post_layernorm.*``. The family adds the checkpoint prefix (``vision_tower.vision_model.`` in
published LLaVA files, ``vision_tower.`` in files saved by transformers 5).

No buffers: a tower built on the ``meta`` device loads with ``load_state_dict(sd, assign=True)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, StrictInt, model_validator
from torch import nn

from ..hookspecs import hookimpl
from ..keymap import KeyMap
from ..protocols import TowerGeometry
from .navit import (
    HiddenAct,
    VisionEncoder,
    VisionParams,
    attention_mask_from_patches,
    check_patch_mask,
    init_vision_weights,
)
from .siglip import interpolate_positions

__all__ = ["ClipParams", "ClipEmbeddings", "ClipVisionTower"]


class ClipParams(VisionParams):
    """``CLIPVisionConfig`` fields with transformers' defaults, plus LLaVA's feature selection.

    ``vision_feature_layer`` and ``vision_feature_select_strategy`` are top-level ``LlavaConfig``
    keys (defaults ``-2`` and ``"default"`` as there); every other field is in ``vision_config``.
    ``projection_dim``, ``initializer_range`` and ``initializer_factor`` are not parameters (no
    projection head is built; initialisation does not change a loaded model).
    """

    hidden_size: int = Field(768, gt=0, description="Vision width of one feature layer.")
    intermediate_size: int = Field(3072, gt=0, description="MLP hidden width.")
    num_attention_heads: int = Field(12, gt=0, description="Attention heads; must divide hidden_size.")
    patch_size: int = Field(32, gt=0, description="Square patch side (pixels); the grid is image_size // patch_size.")
    hidden_act: HiddenAct = Field("quick_gelu", description="MLP activation.")
    layer_norm_eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon.")
    vision_feature_layer: StrictInt | list[StrictInt] = Field(
        -2,
        description="hidden_states index (0 = embeddings, i = after layer i, negative from the end) or a "
        "non-empty list of them, concatenated on the feature axis.",
    )
    vision_feature_select_strategy: Literal["default", "full"] = Field(
        "default", description="'default' drops the class token, 'full' keeps it (one more token per image)."
    )

    @model_validator(mode="after")
    def _check_feature_layers(self) -> ClipParams:
        layers = self.vision_feature_layer
        if isinstance(layers, list) and not layers:
            raise ValueError("vision_feature_layer is an empty list; give an index or a non-empty list of indices")
        n = self.num_hidden_layers
        bad = [i for i in self.feature_layers if not -(n + 1) <= i <= n]
        if bad:
            raise ValueError(
                f"vision_feature_layer {bad[0]} is out of range for num_hidden_layers={n}: hidden_states has "
                f"{n + 1} entries, valid indices are {-(n + 1)}..{n} (0 = embeddings, -1 = last layer)"
            )
        return self

    @property
    def feature_layers(self) -> list[int]:
        """``vision_feature_layer`` as a list of indices, as given (negative ones not resolved)."""
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)


class ClipEmbeddings(nn.Module):
    """Class token, bias-free patch conv and learned position embeddings (transformers' names)."""

    def __init__(self, params: ClipParams) -> None:
        super().__init__()
        dim = params.hidden_size
        self.patch_size = params.patch_size
        self.num_patches_per_side = params.image_size // params.patch_size
        self.class_embedding = nn.Parameter(torch.empty(dim))
        self.patch_embedding = nn.Conv2d(
            params.num_channels, dim, kernel_size=params.patch_size, stride=params.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2 + 1, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, 1 + (H/p)(W/p), D)``; the class token first."""
        n, _, h, w = pixel_values.shape
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(n, 1, -1)
        table = self.position_embedding.weight
        grid = (h // self.patch_size, w // self.patch_size)
        positions = torch.cat(
            [table[None, :1], interpolate_positions(table[1:], self.num_patches_per_side, grid)], dim=1
        )
        return torch.cat([cls, patches], dim=1) + positions


class ClipVisionTower(nn.Module):
    """CLIP vision tower for LLaVA: pixels ``(N, C, H, W)`` -> features ``(N, K, D_v)``.

    ``K = (H/p)(W/p)`` patches (``num_patches_per_side ** 2`` at ``image_size``), plus one for the
    class token with ``vision_feature_select_strategy="full"`` (:attr:`num_tokens`).
    ``D_v = hidden_size`` is ``params.hidden_size`` times the number of feature layers.

    ``patch_attention_mask`` (bool ``(N, H/p, W/p)``) is an extension transformers' CLIP does not
    have: when given and not all True, padded patches are hidden from attention as keys (the class
    token always attends). ``None`` is plain CLIP.
    """

    Params = ClipParams

    def __init__(self, params: ClipParams) -> None:
        super().__init__()
        geometry = self.geometry(params)
        self.params = params
        self.patch_size = geometry.patch_size
        self.image_size = geometry.image_size
        self.num_patches_per_side = geometry.num_patches_per_side
        n = params.num_hidden_layers
        #: Resolved ``hidden_states`` indices (``0..num_hidden_layers``), in the order given.
        self.feature_layers = [i % (n + 1) for i in params.feature_layers]
        self.keep_class_token = params.vision_feature_select_strategy == "full"
        self.hidden_size = geometry.hidden_size
        self.num_tokens = geometry.num_tokens
        self.embeddings = ClipEmbeddings(params)
        self.pre_layrnorm = nn.LayerNorm(params.hidden_size, eps=params.layer_norm_eps)
        self.encoder = VisionEncoder(params)
        self.post_layernorm = nn.LayerNorm(params.hidden_size, eps=params.layer_norm_eps)
        self._init_weights()
        for name, p in self.named_parameters():
            if name in self.inert_parameters:
                p.requires_grad_(False)

    @classmethod
    def geometry(cls, params: ClipParams) -> TowerGeometry:
        """The declared facts (:class:`vlmkit.protocols.DeclaresGeometry`): the square patch grid,
        plus the class token with strategy ``full`` (always stated as ``num_tokens``), rows
        ``hidden_size`` times the number of feature layers wide; no mean/std declared."""
        grid = params.image_size // params.patch_size
        return TowerGeometry(
            image_size=params.image_size, patch_size=params.patch_size, num_patches_per_side=grid,
            hidden_size=params.hidden_size * len(params.feature_layers),
            num_tokens=grid**2 + int(params.vision_feature_select_strategy == "full"),
        )  # fmt: skip

    @property
    def inert_parameters(self) -> list[str]:
        """Parameter names that exist for the checkpoint but never touch the output: the layers
        after the deepest selected one, and ``post_layernorm``."""
        depth = max(self.feature_layers)
        return [
            name
            for name, _ in self.named_parameters()
            if name.startswith("post_layernorm.")
            or (name.startswith("encoder.layers.") and int(name.split(".")[2]) >= depth)
        ]

    def _init_weights(self) -> None:
        """Fresh init (only matters when no checkpoint is loaded); works on ``meta``."""
        dim = self.params.hidden_size
        init_vision_weights(self.encoder, dim)
        nn.init.normal_(self.embeddings.class_embedding, std=dim**-0.5)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=dim**-0.5)
        conv = self.embeddings.patch_embedding
        nn.init.normal_(conv.weight, std=1 / math.sqrt(conv.weight[0].numel()))

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, C, H, W)`` float, optional bool ``(N, H/p, W/p)`` -> ``(N, num_tokens, hidden_size)``."""
        pixel_values = pixel_values.to(self.embeddings.patch_embedding.weight.dtype)
        mask = None
        if patch_attention_mask is not None:
            keys = attention_mask_from_patches(check_patch_mask(patch_attention_mask, pixel_values, self.patch_size))
            if keys is not None:  # the class token is always a valid key
                mask = torch.cat([keys.new_ones(*keys.shape[:-1], 1), keys], dim=-1)
        states = self._hidden_states(self.pre_layrnorm(self.embeddings(pixel_values)), mask)
        selected = [states[i] if self.keep_class_token else states[i][:, 1:] for i in self.feature_layers]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)

    def _hidden_states(self, x: torch.Tensor, mask: torch.Tensor | None) -> dict[int, torch.Tensor]:
        """``(N, 1+P, D)`` -> ``{index: hidden_states[index]}`` for each selected index; runs only
        the layers up to the deepest one (in place on a private copy when no gradient is needed)."""
        wanted = set(self.feature_layers)
        depth = max(wanted)
        inplace = not torch.is_grad_enabled()
        x = x.clone(memory_format=torch.contiguous_format) if inplace else x.contiguous()
        states = {0: x.clone() if inplace and depth > 0 else x} if 0 in wanted else {}
        for i, layer in enumerate(self.encoder.layers[:depth], start=1):
            x = layer(x, mask, inplace=inplace)
            if i in wanted:
                states[i] = x.clone() if inplace and i < depth else x
        return states

    def key_map(self) -> KeyMap:
        """Prefix-free: every state_dict key maps to the same name (``CLIPVisionModel``'s)."""
        return KeyMap.prefixed(self.state_dict().keys(), "")


@hookimpl
def vlmkit_register_components(registry) -> None:  # noqa: ANN001 - pluggy passes the Registry
    """Register :class:`ClipVisionTower` as vision tower ``clip``."""
    registry.add_vision_tower("clip", ClipVisionTower)
