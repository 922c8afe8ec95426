"""``navit``: the variable-resolution SigLIP vision tower of Idefics3 / SmolVLM.

Numerically the same as transformers' ``Idefics3VisionTransformer`` (and SmolVLM's copy of it):
a strided-conv patch embedding, *bucketed fractional* position ids (each image's valid patch grid
is spread over the full ``num_patches_per_side``-square position table, NaViT style), a pre-norm
transformer encoder whose attention ignores padded patches, and a final ``post_layernorm``.

The encoder pieces (:class:`VisionAttention`, :class:`VisionMLP`, :class:`EncoderLayer`,
:class:`VisionEncoder`) use transformers' module names, so state_dict keys equal checkpoint keys
under a prefix; :mod:`vlmkit.components.siglip` reuses them.

Checkpoint layout (SmolVLM / Idefics3): ``model.vision_model.`` + ``embeddings.patch_embedding.*``,
``embeddings.position_embedding.weight``, ``encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*``,
``encoder.layers.{i}.layer_norm{1,2}.*``, ``encoder.layers.{i}.mlp.fc{1,2}.*``, ``post_layernorm.*``.

No buffers: position ids and masks are computed in ``forward``, so a tower built on the ``meta``
device loads with ``load_state_dict(sd, assign=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import ProcessorError
from ..hookspecs import hookimpl
from ..keymap import KeyMap
from ..protocols import TowerGeometry
from .activations import ACTIVATIONS

__all__ = [
    "ACTIVATIONS",
    "VisionParams",
    "NavitParams",
    "VisionAttention",
    "VisionMLP",
    "EncoderLayer",
    "VisionEncoder",
    "NavitEmbeddings",
    "NavitVisionTower",
    "init_vision_weights",
    "bucketed_position_ids",
    "siglip_geometry",
]


HiddenAct = Literal["gelu_pytorch_tanh", "gelu", "quick_gelu", "relu", "silu"]


def _quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    return x.mul_(torch.sigmoid(1.702 * x))


#: In-place versions of :data:`ACTIVATIONS` (bit-identical results), used when no gradient is
#: needed: the activation then writes over ``fc1``'s output instead of allocating another
#: ``(N, P, intermediate_size)`` tensor.
INPLACE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "gelu": lambda x: torch.ops.aten.gelu_(x),
    "quick_gelu": _quick_gelu_,
    "relu": F.relu_,
    "silu": lambda x: F.silu(x, inplace=True),
}


class VisionParams(BaseModel):
    """Settings shared by the SigLIP-style towers; names and meaning as in HF ``vision_config``.

    Subclasses only change defaults. Cross-field checks: ``image_size`` is at least
    ``patch_size`` (the grid is ``image_size // patch_size``; like transformers, a remainder is
    allowed and not seen, e.g. SigLIP-so400m's 384 px / 14 px = 27 patches) and ``hidden_size``
    is a multiple of ``num_attention_heads``.
    """

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(1152, gt=0, description="Vision width D_v.")
    intermediate_size: int = Field(3072, gt=0, description="MLP hidden width.")
    num_hidden_layers: int = Field(12, gt=0, description="Encoder layers.")
    num_attention_heads: int = Field(16, gt=0, description="Attention heads; must divide hidden_size.")
    num_channels: int = Field(3, gt=0, description="Input image channels.")
    image_size: int = Field(224, gt=0, description="Square side (pixels) of the position table.")
    patch_size: int = Field(32, gt=0, description="Square patch side (pixels); the grid is image_size // patch_size.")
    hidden_act: HiddenAct = Field("gelu_pytorch_tanh", description="MLP activation.")
    layer_norm_eps: float = Field(1e-6, gt=0, description="LayerNorm epsilon.")
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Attention dropout (training only).")

    @model_validator(mode="after")
    def _check_divisibility(self) -> VisionParams:
        if self.image_size < self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is smaller than patch_size={self.patch_size}; "
                "the tower would see no patch (image_size must be at least patch_size)"
            )
        if self.hidden_size % self.num_attention_heads:
            divisors = [d for d in range(1, min(self.hidden_size, 64) + 1) if self.hidden_size % d == 0]
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; num_attention_heads must divide hidden_size "
                f"(small valid choices: {', '.join(map(str, divisors))})"
            )
        return self


class NavitParams(VisionParams):
    """``Idefics3VisionConfig`` / ``SmolVLMVisionConfig`` fields, with transformers' defaults."""


class VisionAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections (biases), run through SDPA."""

    def __init__(self, params: VisionParams) -> None:
        super().__init__()
        dim = params.hidden_size
        self.num_heads = params.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.dropout = params.attention_dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, P, D)``, optional bool key mask ``(N, 1, 1, P)`` (True = attend) -> ``(N, P, D)``."""
        n, p, _ = x.shape
        shape = (n, p, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(n, p, -1))


class VisionMLP(nn.Module):
    """``fc1 -> hidden_act -> fc2``: ``(N, P, D) -> (N, P, D)``."""

    def __init__(self, params: VisionParams) -> None:
        super().__init__()
        self.act = ACTIVATIONS[params.hidden_act]
        self.act_ = INPLACE_ACTIVATIONS[params.hidden_act]
        self.fc1 = nn.Linear(params.hidden_size, params.intermediate_size)
        self.fc2 = nn.Linear(params.intermediate_size, params.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, P, D) -> (N, P, D)``."""
        h = self.fc1(x)
        return self.fc2(self.act(h) if torch.is_grad_enabled() else self.act_(h))


class EncoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, params: VisionParams) -> None:
        super().__init__()
        dim, eps = params.hidden_size, params.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = VisionAttention(params)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = VisionMLP(params)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, inplace: bool = False) -> torch.Tensor:
        """``(N, P, D)``, optional ``(N, 1, 1, P)`` bool mask -> ``(N, P, D)``.

        ``inplace`` (no autograd only) adds the residuals into ``x`` itself."""
        if inplace:
            x += self.self_attn(self.layer_norm1(x), mask)
            x += self.mlp(self.layer_norm2(x))
            return x
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """``num_hidden_layers`` :class:`EncoderLayer` in ``self.layers``."""

    def __init__(self, params: VisionParams) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(params) for _ in range(params.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, P, D)``, optional ``(N, 1, 1, P)`` bool mask -> ``(N, P, D)``.

        The residual stream is made contiguous first: the patch embedding's ``transpose`` leaves
        it strided, and then every LayerNorm would copy it (~5% of a 512 px tile). Without
        autograd the stream is a private copy updated in place (fewer large allocations)."""
        if torch.is_grad_enabled():
            x = x.contiguous()
            for layer in self.layers:
                x = layer(x, mask)
            return x
        x = x.clone(memory_format=torch.contiguous_format)
        for layer in self.layers:
            x = layer(x, mask, inplace=True)
        return x


def bucketed_position_ids(patch_mask: torch.Tensor, side: int) -> torch.Tensor:
    """NaViT position ids: bool ``(N, h, w)`` patch mask -> long ``(N, h*w)``.

    Image ``n`` has ``rows`` valid patch rows and ``cols`` valid columns (counted along its first
    column/row, as transformers does). Patch ``(i, j)`` gets the position-table cell
    ``(bucket(i / rows), bucket(j / cols))`` of the ``side x side`` table; padded patches get 0.
    """
    n, h, w = patch_mask.shape
    device = patch_mask.device
    if device.type == "meta":  # shapes only (vlmkit inspect): meta bucketize would load torch's decompositions (~1 s)
        return torch.zeros(n, h * w, dtype=torch.long, device=device)
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device, dtype=torch.float32)
    step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)  # (N,)
    step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)  # (N,)
    coords_h = torch.arange(h, device=device, dtype=torch.float32)[None, :] * step_h[:, None]
    coords_w = torch.arange(w, device=device, dtype=torch.float32)[None, :] * step_w[:, None]
    bucket_h = torch.bucketize(coords_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(coords_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    pos = (bucket_h[:, :, None] * side + bucket_w[:, None, :]).reshape(n, -1)
    return torch.where(patch_mask.reshape(n, -1), pos, torch.zeros_like(pos))


def add_patch_embeddings(module: nn.Module, params: VisionParams) -> None:
    """Give ``module`` SigLIP's strided-conv ``patch_embedding`` and a learned
    ``position_embedding`` table of ``(image_size // patch_size)^2`` rows (transformers' names)."""
    module.patch_size = params.patch_size
    module.num_patches_per_side = params.image_size // params.patch_size
    module.patch_embedding = nn.Conv2d(
        params.num_channels, params.hidden_size, kernel_size=params.patch_size, stride=params.patch_size
    )
    module.position_embedding = nn.Embedding(module.num_patches_per_side**2, params.hidden_size)


class NavitEmbeddings(nn.Module):
    """Patch embedding (strided conv) plus bucketed position embedding."""

    def __init__(self, params: VisionParams) -> None:
        super().__init__()
        add_patch_embeddings(self, params)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` and bool ``(N, H/p, W/p)`` -> ``(N, P, D)``, ``P = (H/p)(W/p)``."""
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        position_ids = bucketed_position_ids(patch_mask, self.num_patches_per_side)
        return patches + self.position_embedding(position_ids)


def init_vision_weights(module: nn.Module, hidden_size: int) -> None:
    """Fresh SigLIP-style init (only matters when no checkpoint is loaded); works on ``meta``."""
    for sub in module.modules():
        if isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=1 / math.sqrt(hidden_size))
        elif isinstance(sub, VisionAttention):
            for lin in (sub.q_proj, sub.k_proj, sub.v_proj, sub.out_proj):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        elif isinstance(sub, VisionMLP):
            for lin in (sub.fc1, sub.fc2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)
        elif isinstance(sub, nn.Conv2d):
            fan_in = sub.weight[0].numel()
            nn.init.normal_(sub.weight, std=1 / math.sqrt(fan_in))
            nn.init.zeros_(sub.bias)


def check_patch_mask(mask: torch.Tensor, pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Validate a ``(N, H/p, W/p)`` patch mask against ``(N, C, H, W)`` pixels; returns it as bool."""
    n, _, h, w = pixel_values.shape
    expected = (n, h // patch_size, w // patch_size)
    if tuple(mask.shape) != expected:
        raise ProcessorError(
            f"patch_attention_mask has shape {tuple(mask.shape)}, expected {expected} "
            f"(images, H/patch_size, W/patch_size) for pixel_values of shape {tuple(pixel_values.shape)}",
            hint="derive it from the pixel mask: a patch is valid when any of its pixels is",
        )
    return mask.bool()


def attention_mask_from_patches(patch_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool ``(N, h, w)`` -> SDPA key mask ``(N, 1, 1, h*w)``, or ``None`` when all patches are valid.

    An image with no valid patch attends everywhere (instead of producing NaN).
    """
    if patch_mask is None:
        return None
    flat = patch_mask.reshape(patch_mask.shape[0], -1)
    if bool(flat.all()):
        return None
    flat = flat | ~flat.any(dim=1, keepdim=True)
    return flat[:, None, None, :]


def siglip_geometry(params: VisionParams) -> TowerGeometry:
    """A SigLIP-style tower's geometry: the ``image_size // patch_size`` square grid of
    ``hidden_size``-wide rows; no mean/std declared (the checkpoint's preprocessor files say)."""
    return TowerGeometry(image_size=params.image_size, patch_size=params.patch_size,
                         num_patches_per_side=params.image_size // params.patch_size, hidden_size=params.hidden_size)  # fmt: skip


def build_siglip_style(tower: nn.Module, params: VisionParams, embeddings: nn.Module) -> None:
    """Give ``tower`` the attributes and modules every SigLIP-style tower has (embeddings,
    encoder, post_layernorm; hidden_size, patch_size, image_size, num_patches_per_side, all from
    :func:`siglip_geometry`, which the towers' ``geometry`` classmethods return)."""
    geometry = siglip_geometry(params)
    tower.params = params
    tower.hidden_size = geometry.hidden_size
    tower.patch_size = geometry.patch_size
    tower.image_size = geometry.image_size
    tower.num_patches_per_side = geometry.num_patches_per_side
    tower.embeddings = embeddings
    tower.encoder = VisionEncoder(params)
    tower.post_layernorm = nn.LayerNorm(params.hidden_size, eps=params.layer_norm_eps)
    init_vision_weights(tower, params.hidden_size)


class NavitVisionTower(nn.Module):
    """Variable-resolution SigLIP (Idefics3 / SmolVLM): pixels -> ``(N, P, D_v)`` patch features.

    ``pixel_values`` ``(N, C, H, W)`` with ``H, W`` multiples of ``patch_size`` (any size; the
    processor normally pads to ``image_size``); ``patch_attention_mask`` bool ``(N, H/p, W/p)``
    marks real patches (``None`` = all real). Outputs cover every patch, padded ones included,
    exactly as transformers computes them.
    """

    Params = NavitParams

    def __init__(self, params: NavitParams) -> None:
        super().__init__()
        build_siglip_style(self, params, NavitEmbeddings(params))

    @classmethod
    def geometry(cls, params: NavitParams) -> TowerGeometry:
        """The declared facts (:class:`vlmkit.protocols.DeclaresGeometry`): see :func:`siglip_geometry`."""
        return siglip_geometry(params)

    def forward(
        self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(N, C, H, W)`` float, optional bool ``(N, H/p, W/p)`` -> ``(N, (H/p)(W/p), D_v)``."""
        pixel_values = pixel_values.to(self.embeddings.patch_embedding.weight.dtype)
        n, _, h, w = pixel_values.shape
        if patch_attention_mask is None:
            mask = torch.ones(n, h // self.patch_size, w // self.patch_size, dtype=torch.bool, device=pixel_values.device)
            attn_mask = None
        else:
            mask = check_patch_mask(patch_attention_mask, pixel_values, self.patch_size)
            attn_mask = attention_mask_from_patches(mask)
        per_chunk = max(1, self.CHUNK_PATCHES // max(1, mask[0].numel()))
        if n <= per_chunk or torch.is_grad_enabled():
            return self._encode(pixel_values, mask, attn_mask)
        # Inference on many images: a few at a time into one output. Images never interact, and
        # at ~1k patches per chunk the matmuls are as efficient as one big batch, while the
        # activations (and their page faults) stay small: 17 tiles of 512 px need ~90 MB
        # instead of ~430 MB, and run no slower.
        out = None
        for start in range(0, n, per_chunk):
            part = slice(start, start + per_chunk)
            chunk_mask = None if attn_mask is None else attention_mask_from_patches(mask[part])
            hidden = self._encode(pixel_values[part], mask[part], chunk_mask)
            if out is None:
                out = hidden.new_empty(n, *hidden.shape[1:])
            out[part] = hidden
        return out

    #: Activation budget when encoding many images without autograd: images are encoded a few at a
    #: time so that a chunk holds about this many patches (at least one image). A speed/memory
    #: setting, not a model fact: the patches per image come from the input.
    CHUNK_PATCHES = 1024

    def _encode(self, pixel_values: torch.Tensor, mask: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.embeddings(pixel_values, mask)
        hidden = self.encoder(hidden, attn_mask)
        return self.post_layernorm(hidden)

    def key_map(self) -> KeyMap:
        """Every state_dict key under ``model.vision_model.`` (SmolVLM / Idefics3 checkpoints)."""
        return KeyMap.prefixed(self.state_dict().keys(), "")


@hookimpl
def vlmkit_register_components(registry) -> None:  # noqa: ANN001 - pluggy passes the Registry
    """Register :class:`NavitVisionTower` as vision tower ``navit``."""
    registry.add_vision_tower("navit", NavitVisionTower)
