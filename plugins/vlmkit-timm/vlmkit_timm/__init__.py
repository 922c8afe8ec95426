"""vlmkit-timm: any timm ViT-style model as a vlmkit vision tower (registry name ``timm``).

A vlmkit plugin is a module with a :func:`vlmkit.hookimpl`-decorated
``vlmkit_register_components``; this one is found through the ``vlmkit`` entry-point group
declared in its ``pyproject.toml``::

    [project.entry-points.vlmkit]
    timm = "vlmkit_timm"

YAML::

    vision_tower: {name: timm, model_name: vit_small_patch16_224}

Everything about the tower -- width, patch size, grid, input size, the normalisation mean/std --
is read from timm's own model and its ``pretrained_cfg``; only the model name is typed.

Weights. The tower holds the timm model as ``self.model``, so its state_dict keys are
``model.`` + timm's names. :meth:`TimmVisionTower.key_map` maps them to timm's own names
(``blocks.0.attn.qkv.weight``); the checkpoint's family places them
(``model.vision_model.blocks...`` in a SmolVLM/Idefics3-layout folder, so a model saved by vlmkit
reloads; unchanged in the ``model.safetensors`` of a timm Hub repo, downloaded beforehand, as
``weights: {vision_tower: folder}``). The classifier head and SigLIP's attention-pool head are not built, so their
tensors are not read. ``pretrained: true`` makes timm download its weights (network or a
filled Hugging Face cache needed); it is ignored when the builder loads this slot from a
checkpoint. :func:`siglip_to_timm` converts a transformers SigLIP vision state dict to timm
names.

timm is imported lazily (when a tower or a spec using it is built), so loading the plugin,
which every vlmkit command does, stays cheap.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Mapping
from typing import Any

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

import vlmkit
from vlmkit.errors import ProcessorError, SourceNotFoundError, SpecError
from vlmkit.keymap import KeyMap
from vlmkit.protocols import TowerGeometry

__version__ = "0.1.0"
__all__ = ["TimmParams", "TimmVisionTower", "close_timm_names", "siglip_to_timm", "vlmkit_register_components"]

def close_timm_names(name: str, n: int = 6) -> list[str]:
    """Registered timm ViT-style names closest to ``name`` (``timm.list_models('*vit*')`` + difflib)."""
    import timm

    pool = timm.list_models("*vit*")
    base = name.split(".")[0]
    hits = difflib.get_close_matches(base, pool, n=n, cutoff=0.6)
    return hits or difflib.get_close_matches(base, pool, n=n, cutoff=0.3)


def _check_model_name(name: str) -> str:
    import timm

    if not timm.is_model(name):
        near = close_timm_names(name)
        raise ValueError(  # pydantic wraps it; vlmkit's spec layer turns it into a SpecError
            f"unknown timm model {name!r}; "
            + (f"close timm names: {', '.join(near)}" if near else "no similar timm ViT name")
            + " (timm.list_models('*vit*') lists them all)"
        )
    return name


class TimmParams(BaseModel):
    """Settings of the ``timm`` tower. Only ``model_name`` is required."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(description="A timm model name, e.g. vit_small_patch16_224 (a `.tag` suffix is allowed).")
    img_size: int | None = Field(
        default=None, gt=0, description="Square input side override (timm resizes the position table); None: timm's."
    )
    pretrained: bool = Field(
        default=False,
        description="Let timm download its pretrained weights (needs network or a filled Hugging Face cache).",
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra timm.create_model keyword arguments (architecture overrides, e.g. depth for tiny tests).",
    )

    @field_validator("model_name")
    @classmethod
    def _known(cls, value: str) -> str:
        return _check_model_name(value)

    @field_validator("model_kwargs")
    @classmethod
    def _no_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(value) & {"pretrained", "num_classes", "img_size", "model_name"})
        if taken:
            raise ValueError(f"model_kwargs may not set {', '.join(taken)}; use the tower's own params")
        return value


def _square(value: Any, what: str, name: str) -> int:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or pair[0] != pair[1]:
        raise SpecError(
            f"timm model {name!r} has a non-square {what} {pair}; vlmkit vision towers are square",
            key_path="vision_tower.model_name",
        )
    return int(pair[0])


def _create(params: TimmParams) -> nn.Module:
    """``timm.create_model`` without classifier or pooling head (never downloads on ``meta``)."""
    import timm

    kwargs = dict(params.model_kwargs)
    if params.img_size is not None:
        kwargs["img_size"] = params.img_size
    pretrained = params.pretrained and torch.get_default_device().type != "meta"
    try:
        try:  # dynamic_img_size: other input sizes interpolate the position table (ViT, EVA, ...)
            model = timm.create_model(params.model_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **kwargs)
        except TypeError as exc:
            if "dynamic_img_size" not in str(exc):
                raise
            model = timm.create_model(params.model_name, pretrained=pretrained, num_classes=0, **kwargs)
    except OSError as exc:  # pretrained download: no network and not in the Hugging Face cache
        raise SourceNotFoundError(
            f"timm could not fetch the pretrained weights of {params.model_name!r} ({type(exc).__name__}: {exc})",
            hint="pretrained: true needs network access or a filled Hugging Face cache; otherwise set "
            "pretrained: false, or save timm's model.safetensors to a folder and use "
            "weights: {vision_tower: folder}",
        ) from exc
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise SpecError(
            f"timm could not create {params.model_name!r} with {kwargs}: {type(exc).__name__}: {exc}",
            key_path="vision_tower",
            hint="check img_size / model_kwargs against the timm model's arguments",
        ) from exc
    try:  # drop SigLIP's attention-pool head (unused: a VLM consumes patch tokens)
        model.reset_classifier(0, global_pool="")
    except (TypeError, AssertionError, ValueError):
        model.reset_classifier(0)
    return model


def _model_geometry(model: nn.Module, name: str) -> TowerGeometry:
    """The geometry of a created timm model (its ``patch_embed`` and ``pretrained_cfg``)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(model, "num_prefix_tokens") or not hasattr(model, "forward_features"):
        raise SpecError(
            f"timm model {name!r} is not ViT-style (it needs patch_embed, num_prefix_tokens and "
            "forward_features returning (N, prefix + patches, D) tokens)",
            key_path="vision_tower.model_name",
            hint="pick a ViT-family model, e.g. vit_small_patch16_224, vit_base_patch16_siglip_224, vit_small_patch14_dinov2",
        )
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return TowerGeometry(
        image_size=_square(embed.img_size, "image size", name),
        patch_size=_square(embed.patch_size, "patch size", name),
        num_patches_per_side=_square(embed.grid_size, "patch grid", name),
        hidden_size=int(getattr(model, "num_features", None) or model.embed_dim),
        image_mean=tuple(float(v) for v in cfg.get("mean", (0.5, 0.5, 0.5))),
        image_std=tuple(float(v) for v in cfg.get("std", (0.5, 0.5, 0.5))),
    )


@functools.lru_cache(maxsize=16)
def _geometry_of(params_json: str) -> TowerGeometry:
    """:func:`_model_geometry` of the timm model ``params_json`` describes, created on the meta device
    (no memory, no download); cached: the same params always give the same model."""
    params = TimmParams.model_validate_json(params_json)
    with torch.device("meta"):
        return _model_geometry(_create(params), params.model_name)


class TimmVisionTower(nn.Module):
    """A timm ViT as a vision tower: pixels ``(N, 3, H, W)`` -> patch features ``(N, P, D_v)``.

    Runs timm's ``forward_features`` (patch embedding, position embedding, blocks, final norm)
    and drops the ``num_prefix_tokens`` leading tokens (class and register tokens), so ``P`` is
    ``(H/p) * (W/p)`` in row-major order -- the square grid the ``idefics3`` connector shuffles.
    Models whose final norm sits in the head (``fc_norm``, e.g. EVA-02) get it applied to the
    patch tokens instead.
    Inputs other than ``image_size`` work when the timm model supports ``dynamic_img_size``.

    ``patch_attention_mask`` (bool ``(N, H/p, W/p)``) hides padded patches as attention keys when
    the model's ``forward_features`` takes ``attn_mask`` (timm ``VisionTransformer``); other
    models ignore it. Attributes: ``hidden_size``, ``patch_size``, ``image_size``,
    ``num_patches_per_side``, ``num_prefix_tokens``, ``image_mean``, ``image_std``.
    """

    Params = TimmParams

    def __init__(self, params: TimmParams | Mapping[str, Any]) -> None:
        super().__init__()
        if not isinstance(params, TimmParams):
            try:
                params = TimmParams.model_validate(params)
            except pydantic.ValidationError as exc:
                raise SpecError(str(exc), key_path="vision_tower") from None
        self.params = params
        self.model = _create(params)
        geometry = _model_geometry(self.model, params.model_name)
        self.hidden_size = geometry.hidden_size
        self.patch_size = geometry.patch_size
        self.image_size = geometry.image_size
        self.num_patches_per_side = geometry.num_patches_per_side
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        self.image_mean, self.image_std = geometry.image_mean, geometry.image_std
        self._takes_mask = "attn_mask" in inspect.signature(self.model.forward_features).parameters
        # The final norm: inside forward_features (`norm`), or -- for avg-pool models such as EVA-02
        # -- in the head (`fc_norm`), which then normalises the patch tokens here. An fc_norm that
        # forward never uses is dropped (no dead weights).
        fc_norm = getattr(self.model, "fc_norm", None)
        self._head_norm = isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity)
        if self._head_norm and not isinstance(getattr(self.model, "norm", nn.Identity()), nn.Identity):
            self.model.fc_norm, self._head_norm = nn.Identity(), False
        # Non-persistent buffers (RoPE tables...) built on `meta` are not in any checkpoint;
        # they are recomputed on CPU when the module is first moved or run.
        self._meta_buffers = any(b.is_meta for b in self.model.buffers())

    @classmethod
    def geometry(cls, params: TimmParams) -> TowerGeometry:
        """The declared facts (:class:`vlmkit.protocols.DeclaresGeometry`). They need the timm model:
        its patch size, grid and width come from timm's architecture and its mean/std from the
        model's ``pretrained_cfg``, which only a created model holds. So this creates just the timm
        model on the meta device (no memory, no download; cached per params), never a whole VLM."""
        if not isinstance(params, TimmParams):
            params = TimmParams.model_validate(params)
        return _geometry_of(params.model_dump_json(exclude={"pretrained"}))

    def _fill_meta_buffers(self) -> None:
        if not self._meta_buffers:
            return
        self._meta_buffers = False
        with torch.device("cpu"):
            fresh = dict(_create(self.params.model_copy(update={"pretrained": False})).named_buffers())
        for name, buf in list(self.model.named_buffers()):
            if buf.is_meta:
                owner, _, leaf = name.rpartition(".")
                self.model.get_submodule(owner)._buffers[leaf] = fresh[name]  # noqa: SLF001

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module internals (.to(), .float()...)
        self._fill_meta_buffers()
        return super()._apply(fn, recurse)

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, 3, H, W)`` float, optional bool ``(N, H/p, W/p)`` -> ``(N, (H/p)(W/p), D_v)``."""
        weight = self.model.patch_embed.proj.weight if hasattr(self.model.patch_embed, "proj") else next(self.parameters())
        pixel_values = pixel_values.to(weight.dtype)
        if pixel_values.device.type != "meta":  # a shape trace on meta (vlmkit inspect) needs no values
            self._fill_meta_buffers()
        mask = self._key_mask(patch_attention_mask, pixel_values) if self._takes_mask else None
        tokens = self.model.forward_features(pixel_values) if mask is None else self.model.forward_features(pixel_values, attn_mask=mask)
        tokens = tokens[:, self.num_prefix_tokens :]
        return self.model.fc_norm(tokens) if self._head_norm else tokens

    def _key_mask(self, patch_mask: torch.Tensor | None, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """Bool ``(N, h, w)`` -> SDPA key mask ``(N, 1, 1, prefix + h*w)`` (None when all patches are real)."""
        if patch_mask is None:
            return None
        n, _, h, w = pixel_values.shape
        expected = (n, h // self.patch_size, w // self.patch_size)
        if tuple(patch_mask.shape) != expected:
            raise ProcessorError(
                f"patch_attention_mask has shape {tuple(patch_mask.shape)}, expected {expected} "
                f"(images, H/patch_size, W/patch_size) for pixel_values of shape {tuple(pixel_values.shape)}"
            )
        flat = patch_mask.reshape(n, -1).bool()
        if bool(flat.all()):
            return None
        flat = flat | ~flat.any(dim=1, keepdim=True)  # an all-padding image attends everywhere (no NaN)
        prefix = flat.new_ones(n, self.num_prefix_tokens)
        return torch.cat([prefix, flat], dim=1)[:, None, None, :]

    def key_map(self) -> KeyMap:
        """``model.<timm name>`` <- ``<timm name>`` (the checkpoint's family adds its prefix)."""
        local = list(self.state_dict().keys())
        return KeyMap.prefixed(local, "", renames={k: k[len("model.") :] for k in local})

    def extra_repr(self) -> str:
        return (
            f"model_name={self.params.model_name!r}, hidden_size={self.hidden_size}, patch_size={self.patch_size}, "
            f"image_size={self.image_size}, prefix_tokens={self.num_prefix_tokens}"
        )


_SIGLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_SIGLIP_RENAMES = {
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}  # fmt: skip


def siglip_to_timm(state_dict: Mapping[str, torch.Tensor], prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
    """A transformers SigLIP vision state dict (keys under ``prefix``) -> timm ``VisionTransformer`` names.

    ``q/k/v_proj`` are stacked into ``attn.qkv``, the ``(P, D)`` position table becomes timm's
    ``(1, P, D)`` ``pos_embed`` and ``post_layernorm`` becomes ``norm``; the pooling ``head.*`` is
    dropped. The result loads into ``timm.create_model('vit_*_siglip_*')`` (or a
    :class:`TimmVisionTower` through its key map, which reads timm's names).
    """
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    out: dict[str, torch.Tensor] = {}
    simple = {
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    for key, value in sd.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value[None]
        elif (m := _SIGLIP_LAYER.fullmatch(key)) is not None:
            i, rest = m.groups()
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                if rest.startswith("self_attn.q_proj."):
                    kind = rest.rsplit(".", 1)[1]
                    parts = [sd[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
                continue
            module, kind = rest.rsplit(".", 1)
            if module not in _SIGLIP_RENAMES:
                raise ValueError(f"siglip_to_timm: no timm name for {prefix}{key}")
            out[f"blocks.{i}.{_SIGLIP_RENAMES[module]}.{kind}"] = value
        else:
            raise ValueError(f"siglip_to_timm: no timm name for {prefix}{key}")
    return out


@vlmkit.hookimpl
def vlmkit_register_components(registry) -> None:  # noqa: ANN001 - pluggy passes the Registry
    """Register :class:`TimmVisionTower` as vision tower ``timm``."""
    registry.add_vision_tower("timm", TimmVisionTower)
