"""The ``w8a8`` model as plain tensors, for the quantization cache (:mod:`vlmkit.quant_cache`).

:func:`quantize_int8 <vlmkit.quantize.quantize_int8>` changes a model in two ways: its linear
layers become :class:`~vlmkit.quantize.Int8Linear` (int8 weights, float32 scales, a bias), and
SmoothQuant replaces some float parameters (the RMSNorm weights the scales are folded into).
:func:`int8_tensors` lists both as a flat ``{name: tensor}`` dict -- ``"<linear>::qweight"``
``(out, in)`` int8, ``"<linear>::scales"`` ``(out,)``, ``"<linear>::bias"`` ``(out,)``,
``"<parameter>::smoothed"`` (the parameter's shape) -- and :func:`apply_int8` rebuilds the same
quantized model from them on a fresh float32 one (re-packing each weight for this CPU's kernel),
without calibrating or smoothing again: the logits are bit-identical to the first run's.
:func:`int8_mismatch` says why stored tensors do not fit a model (then they are not used).
"""

from __future__ import annotations

import torch
from torch import nn

from .quantize import DEFAULT_SLOTS, Int8Linear, check_quantizable, int8_targets

__all__ = ["int8_tensors", "int8_mismatch", "apply_int8"]

#: the suffix of a float parameter SmoothQuant replaced
SMOOTHED = "smoothed"


def int8_tensors(model: nn.Module, before: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """The tensors of a model :func:`~vlmkit.quantize.quantize_int8` has just quantized; ``before``
    lists the parameters it had before (a parameter not among them was replaced). The list itself,
    not ids, must be kept from before quantizing: a freed parameter's ``id`` can be reused."""
    old = {id(p) for p in before}
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            out.update({f"{name}::{k}": v for k, v in module.tensors().items()})
    for name, param in model.named_parameters():
        if id(param) not in old:
            out[f"{name}::{SMOOTHED}"] = param.detach()
    return out


def _targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers :func:`~vlmkit.quantize.quantize_int8` swaps with its defaults, by name."""
    out = {}
    for slot in DEFAULT_SLOTS:
        component = getattr(model, slot, None)
        if isinstance(component, nn.Module):
            skip = frozenset({"lm_head"}) if slot == "backbone" else frozenset()
            out.update({f"{slot}.{full}": lin for _, _, full, lin in int8_targets(component, skip)})
    return out


def _split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``({linear name: {part: tensor}}, {parameter name: tensor})``."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    params: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name, _, part = key.rpartition("::")
        if part == SMOOTHED:
            params[name] = value
        else:
            layers.setdefault(name, {})[part] = value
    return layers, params


def _layer_mismatch(name: str, lin: nn.Linear, parts: dict[str, torch.Tensor]) -> str | None:
    """Why ``parts`` cannot be ``lin``'s int8 layer (None when they can)."""
    want = {"qweight": ((lin.out_features, lin.in_features), torch.int8), "scales": ((lin.out_features,), torch.float32)}
    if lin.bias is not None:
        want["bias"] = ((lin.out_features,), torch.float32)
    if set(parts) != set(want):
        return f"{name} stores {sorted(parts)}, expected {sorted(want)}"
    for part, (shape, dtype) in want.items():
        if tuple(parts[part].shape) != shape or parts[part].dtype != dtype:
            return f"{name}::{part} is {parts[part].dtype} {tuple(parts[part].shape)}, expected {dtype} {shape}"
    return None


def int8_mismatch(model: nn.Module, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why ``tensors`` (from :func:`int8_tensors`) do not fit float32 ``model`` (None when they do):
    another set of linear layers, a shape or dtype that differs, a parameter the model lacks."""
    layers, params = _split(tensors)
    targets = _targets(model)
    if set(layers) != set(targets):
        extra, missing = sorted(set(layers) - set(targets)), sorted(set(targets) - set(layers))
        return f"its layers differ from the model's (not in the model: {extra[:3]}; missing: {missing[:3]})"
    for name, lin in targets.items():
        why = _layer_mismatch(name, lin, layers[name])
        if why is not None:
            return why
    own = dict(model.named_parameters())
    for name, value in params.items():
        if name not in own or own[name].shape != value.shape or own[name].dtype != value.dtype:
            return f"the model has no float parameter {name} of shape {tuple(value.shape)}"
    return None


def apply_int8(model: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Quantize float32 ``model`` in place from ``tensors`` (checked with :func:`int8_mismatch`
    first); returns the number of :class:`~vlmkit.quantize.Int8Linear` layers. Raises
    :class:`~vlmkit.errors.VlmkitError` as :func:`~vlmkit.quantize.quantize_int8` does (another
    device or dtype, a torch without quantized kernels)."""
    check_quantizable(model, tuple(s for s in DEFAULT_SLOTS if isinstance(getattr(model, s, None), nn.Module)), None)
    layers, params = _split(tensors)
    for name, value in params.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, attr)
        setattr(module, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    for name, parts in layers.items():
        owner, _, attr = name.rpartition(".")
        layer = Int8Linear.from_quantized(parts["qweight"], parts["scales"], parts.get("bias"))
        setattr(model.get_submodule(owner), attr, layer)
    model.quantized = "int8"
    return len(layers)
