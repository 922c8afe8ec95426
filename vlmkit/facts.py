"""A spec's declared facts: the numbers a processor needs about a model, from the params alone.

The processor of an assembled model needs the tower's image geometry (input side, patch grid,
mean/std), the connector's visual tokens per image, the packer's placeholder id and the
backbone's vocabulary. Components state them through the optional classmethods of
:mod:`vlmkit.protocols` (``geometry``, ``count_tokens``, ``widths``) and the wiring
(:func:`vlmkit.wiring.assemble`) uses the same functions, checking the built instances against
them: one source of truth.

A component that declares nothing still works: a vision tower or connector is then built alone on
the meta device (no memory, no values; only that slot) and its attributes read. The backbone is
never built for facts: without ``widths`` its params' ``hidden_size`` / ``vocab_size`` fields are
read, or the facts leave the vocabulary out (the processor then takes the tokenizer's).

:func:`make_component` instantiates one slot (the wiring builds every slot through it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .errors import PluginError, SpecError, VlmkitError, short_repr
from .protocols import DeclaresGeometry, DeclaresTokenCount, DeclaresWidths, TextWidths, TowerGeometry

__all__ = [
    "SpecFacts", "ValuelessInit", "make_component", "geometry_of", "tower_geometry", "connector_tokens", "text_widths",
    "spec_facts", "checked_geometry", "checked_tokens", "packer_tokens", "check_placeholder",
]  # fmt: skip


@dataclass(frozen=True)
class SpecFacts:
    """What a processor needs to know about the model a spec makes (no module built).

    ``geometry`` the tower's; ``tokens_per_image`` K, the visual tokens per image (tile);
    ``image_token_id`` the packer's placeholder; ``vocab_size`` the backbone's (``None`` when its
    params do not say and it declares no ``widths``)."""

    geometry: TowerGeometry
    tokens_per_image: int
    image_token_id: int
    vocab_size: int | None


def _entry(spec: Any, slot: str):
    from .plugins import get_registry

    return get_registry().get(slot, getattr(spec, slot).name)


def _guarded(entry: Any, slot: str, doing: str, call: Callable[[], Any]) -> Any:
    """``call()``; impossible params become a :class:`SpecError`, other failures a
    :class:`PluginError` naming the plugin (never a raw torch error)."""
    try:
        return call()
    except VlmkitError:
        raise
    except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
        raise SpecError(
            f"{entry.name!r} cannot be built from these params ({type(exc).__name__}: {short_repr(str(exc), 200)})",
            key_path=slot, hint="a size is impossible or far too large; check the numbers of this slot",
        ) from exc
    except Exception as exc:
        raise PluginError(
            f"{slot} {entry.name!r} (plugin {entry.plugin!r}) failed while {doing}: {type(exc).__name__}: {exc}",
            hint="this is a bug in that component; run with --debug and report it to its authors",
        ) from exc


class ValuelessInit(torch.overrides.TorchFunctionMode):
    """Inside it, an initialiser of ``torch.nn.init`` or a random fill (``normal_``,
    ``uniform_``, ...) applied to a meta tensor returns the tensor untouched: it has no values. Only this
    context changes; other tensors and ops pass through. Why: torch's meta ``normal_`` imports
    ``torch._dynamo`` on its first call (1.3-2.4 s, measured with torch 2.14), which every first
    model build in a process and ``vlmkit inspect`` would pay for nothing."""

    FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.log_normal_, torch.Tensor.exponential_,
                       torch.Tensor.cauchy_, torch.Tensor.geometric_, torch.Tensor.random_, torch.Tensor.bernoulli_})  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in self.FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def make_component(spec: Any, slot: str, meta: bool, **widths: Any) -> nn.Module:
    """Instantiate ``slot``'s component of ``spec`` as ``cls(params, **widths)`` (on the meta
    device, with :class:`ValuelessInit`, when ``meta``)."""
    entry = _entry(spec, slot)

    def build():
        with torch.device("meta") if meta else contextlib.nullcontext(), ValuelessInit() if meta else contextlib.nullcontext():
            return entry.cls(getattr(spec, slot).params, **widths)

    return _guarded(entry, slot, "being built", build)


def geometry_of(tower: nn.Module) -> TowerGeometry:
    """The :class:`TowerGeometry` a built tower's attributes state."""
    mean, std = getattr(tower, "image_mean", None), getattr(tower, "image_std", None)
    return TowerGeometry(
        image_size=tower.image_size, patch_size=tower.patch_size, num_patches_per_side=tower.num_patches_per_side,
        hidden_size=tower.hidden_size, num_tokens=getattr(tower, "num_tokens", None),
        image_mean=None if mean is None else tuple(float(v) for v in mean),
        image_std=None if std is None else tuple(float(v) for v in std),
    )  # fmt: skip


def _declared(entry: Any, slot: str, method: str, kind: type, call: Callable[[], Any]) -> Any:
    value = _guarded(entry, slot, f"answering {method}()", call)
    if not isinstance(value, kind):
        raise PluginError(
            f"{slot} {entry.name!r} (plugin {entry.plugin!r}): {method}() returned {short_repr(value)}, "
            f"not a {kind.__name__}",
            hint=f"return a vlmkit.protocols.{kind.__name__}" if kind is not int else "return an int",
        )
    return value


def tower_geometry(spec: Any) -> TowerGeometry:
    """The vision tower's geometry: its declared ``geometry(params)``, else the attributes of the
    tower alone built on the meta device."""
    entry, params = _entry(spec, "vision_tower"), spec.vision_tower.params
    if isinstance(entry.cls, DeclaresGeometry):
        return _declared(entry, "vision_tower", "geometry", TowerGeometry, lambda: entry.cls.geometry(params))
    return geometry_of(make_component(spec, "vision_tower", True))


def text_widths(spec: Any) -> TextWidths | None:
    """The backbone's widths: its declared ``widths(params)``, else its params' ``hidden_size`` and
    ``vocab_size`` (``None`` when they have none: the backbone is never built for this)."""
    entry, params = _entry(spec, "backbone"), spec.backbone.params
    if isinstance(entry.cls, DeclaresWidths):
        return _declared(entry, "backbone", "widths", TextWidths, lambda: entry.cls.widths(params))
    hidden, vocab = getattr(params, "hidden_size", None), getattr(params, "vocab_size", None)
    return TextWidths(hidden, vocab) if isinstance(hidden, int) and isinstance(vocab, int) else None


def connector_tokens(spec: Any, geometry: TowerGeometry, out_features: int | None = None) -> int:
    """Visual tokens per image: the connector's declared ``count_tokens(params, grid=, num_tokens=)``,
    else its ``tokens_per_image`` built alone on the meta device (``in_features`` the tower's width,
    ``out_features`` the one given, else the backbone's declared width, else the tower's)."""
    entry, params = _entry(spec, "connector"), spec.connector.params
    grid, extra = geometry.num_patches_per_side, _num_tokens(geometry)
    if isinstance(entry.cls, DeclaresTokenCount):
        return _declared(entry, "connector", "count_tokens", int,
                         lambda: entry.cls.count_tokens(params, grid=grid, **extra))  # fmt: skip
    if out_features is None:
        widths = text_widths(spec)
        out_features = geometry.hidden_size if widths is None else widths.hidden_size
    conn = make_component(spec, "connector", True, in_features=geometry.hidden_size, grid=grid,
                          out_features=out_features, **extra)  # fmt: skip
    return conn.tokens_per_image


def _num_tokens(geometry: TowerGeometry) -> dict[str, int]:
    """``{"num_tokens": K}`` for a tower whose rows are not the square grid (passed to the connector)."""
    return {} if geometry.num_tokens is None else {"num_tokens": geometry.num_tokens}


def spec_facts(spec: Any) -> SpecFacts:
    """The :class:`SpecFacts` of ``spec``, from the params (see the module docstring)."""
    geometry = tower_geometry(spec)
    widths = text_widths(spec)
    tokens = packer_tokens(spec, connector_tokens(spec, geometry, None if widths is None else widths.hidden_size))
    image_token_id = spec.packer.params.image_token_id
    if widths is not None:
        check_placeholder(image_token_id, widths.vocab_size)
    return SpecFacts(geometry, tokens, image_token_id, None if widths is None else widths.vocab_size)


def packer_tokens(spec: Any, made: int) -> int:
    """The packer's tokens per image: the connector's count ``made``; a ``packer.tokens_per_image``
    param that disagrees is a :class:`SpecError`."""
    declared = getattr(spec.packer.params, "tokens_per_image", None)
    if declared is not None and declared != made:
        raise SpecError(
            f"packer.tokens_per_image is {declared} but the connector makes {made} "
            "visual tokens per image (from the tower's patch grid and the connector's scale)",
            key_path="packer.tokens_per_image",
            hint="remove tokens_per_image to take the connector's count, or fix the scale/image size",
        )
    return made


def check_placeholder(image_token_id: int, vocab_size: int) -> None:
    """A :class:`SpecError` when the image placeholder id is not a row of the vocabulary."""
    if not 0 <= image_token_id < vocab_size:
        raise SpecError(
            f"image_token_id {image_token_id} is outside the backbone vocabulary (vocab_size {vocab_size})",
            key_path="packer.image_token_id",
            hint=f"pick an id below {vocab_size} (the tokenizer's <image> id), or raise the backbone's vocab_size",
        )


def checked_geometry(spec: Any, tower: nn.Module) -> TowerGeometry:
    """The built ``tower``'s geometry; a :class:`PluginError` when its class declares another one."""
    entry, built = _entry(spec, "vision_tower"), geometry_of(tower)
    if isinstance(entry.cls, DeclaresGeometry):
        declared = tower_geometry(spec)
        if declared != built:
            diff = [f"{f.name} {getattr(declared, f.name)!r} vs {getattr(built, f.name)!r}" for f in fields(built)
                    if getattr(declared, f.name) != getattr(built, f.name)]  # fmt: skip
            raise PluginError(
                f"vision_tower {entry.name!r} (plugin {entry.plugin!r}) declares a geometry its instance does not "
                f"have (declared vs built): {'; '.join(diff)}",
                hint="set the tower's attributes from its geometry(params) classmethod",
            )
    return built


def checked_tokens(spec: Any, connector: nn.Module, geometry: TowerGeometry) -> int:
    """The built ``connector``'s ``tokens_per_image``; a :class:`PluginError` when its class declares another count."""
    entry = _entry(spec, "connector")
    if isinstance(entry.cls, DeclaresTokenCount):
        declared = connector_tokens(spec, geometry)
        if declared != connector.tokens_per_image:
            raise PluginError(
                f"connector {entry.name!r} (plugin {entry.plugin!r}) declares {declared} tokens per image but its "
                f"instance makes {connector.tokens_per_image}",
                hint="set tokens_per_image from the connector's count_tokens classmethod",
            )
    return connector.tokens_per_image
