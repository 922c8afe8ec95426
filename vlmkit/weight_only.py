"""Weight-only int8 / int4 linear layers for one-row decode on the CPU (activations stay float32).

:class:`WeightOnlyLinear` keeps the layer's float32 weight for prompts, image patches and batched
rows (so prefill and vision are never slower than float32) and a quantized copy for one-row calls
(a decode step), which read 4x (int8) or ~8x (int4) fewer bytes:

* ``w8``: int8, symmetric, one scale per output channel; vlmkit's own kernel
  (:func:`vlmkit.native.gemv_i8`) where it compiled, else ``torch.ops.aten._weight_int8pack_mm``;
* ``w4``: int4, asymmetric, one scale and minimum per group of :data:`W4_GROUPS` input channels;
  vlmkit's own kernel (:func:`vlmkit.native.gemv_q4`), else
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on a copy repacked for it at the first call.

The float weight stays, so memory grows by the quantized copy (+25% for ``w8``, +~14% for
``w4``). Whether these kernels beat float32 depends on the CPU: :mod:`vlmkit.scheme_choice`
times them on the model's own weights (:func:`vlmkit.quant_schemes.quantize`, scheme ``auto``).
Shapes: ``x`` ``(..., in)`` -> ``(..., out)``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import native
from .decode_layout import linear_rows

__all__ = ["WeightOnlyLinear", "WEIGHT_ONLY", "W4_GROUPS", "quantize_w8", "quantize_w4", "unpack_w4"]

#: The weight-only schemes and what their quantized copy holds.
WEIGHT_ONLY = {"w8": "int8 per output channel", "w4": "int4, groups of input channels"}
#: int4 group sizes tried, largest first (the first that divides ``in_features``).
W4_GROUPS = (128, 64, 32)


def quantize_w8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(out, in)`` float -> ``{"q8": (out, in) int8, "scale": (out,) float32}``."""
    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return {"q8": torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), "scale": scale}


def w4_group(in_features: int) -> int | None:
    """The int4 group size for ``in_features`` (None when no size of :data:`W4_GROUPS` divides it)."""
    return next((g for g in W4_GROUPS if in_features % g == 0), None)


def quantize_w4(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """``(out, in)`` float -> ``{"q4": (out, in // 2) uint8, "scale", "lo": (out, in // group)}``
    with ``w ~ q * scale + lo``, ``q`` in 0..15, per group of ``group`` inputs (a multiple of 32).
    Per block of 32 inputs byte ``j`` holds ``q[j] | q[j + 16] << 4`` (:func:`vlmkit.native.gemv_q4`)."""
    w = weight.detach().to(torch.float32)
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((g - lo) / scale).clamp_(0, 15).to(torch.uint8).reshape(out, inp // 32, 2, 16)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(out, inp // 2).contiguous()
    return {"q4": packed, "scale": scale.reshape(out, -1).contiguous(), "lo": lo.reshape(out, -1).contiguous()}


def unpack_w4(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``(out, in)`` int32 values ``q`` (0..15) of :func:`quantize_w4`'s ``q4``."""
    packed = tensors["q4"]
    out = packed.shape[0]
    b = packed.reshape(out, -1, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(out, -1).to(torch.int32)


def _torch_w4(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's packed int4 weight and ``(groups, out, 2)`` scale/zero for the same values
    (``_weight_int4pack_mm_for_cpu`` computes ``(q - 8) * scale + zero``)."""
    scale, lo = tensors["scale"], tensors["lo"]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_w4(tensors), 1)
    return packed, torch.stack([scale.t(), (lo + 8.0 * scale).t()], dim=-1).contiguous()


class WeightOnlyLinear(nn.Linear):
    """An :class:`torch.nn.Linear` (float32 ``weight``, optional ``bias``) plus a quantized copy
    (``scheme`` ``w8`` or ``w4``) used for one-row inputs; see the module docstring."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, tensors: dict[str, torch.Tensor] | None = None) -> WeightOnlyLinear:
        """Wrap ``linear`` (its parameters are shared); ``tensors`` a cached quantized copy."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.scheme = scheme
        new.group = w4_group(linear.in_features) if scheme == "w4" else None
        if tensors is None:
            tensors = quantize_w8(linear.weight) if scheme == "w8" else quantize_w4(linear.weight, new.group)
        new.quantized = dict(tensors)  # plain tensors, not parameters or buffers: the state dict stays float
        new.torch_w4 = None
        return new

    @property
    def nbytes(self) -> int:
        """Bytes a one-row call reads: the quantized copy (and the bias)."""
        extra = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return sum(t.numel() * t.element_size() for t in self.quantized.values()) + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or x.dtype != torch.float32:
            return linear_rows(x, self.weight, self.bias)
        row = x.reshape(1, self.in_features)
        if self.scheme == "w8":
            y = native.gemv_i8(row, self.quantized["q8"], self.quantized["scale"], self.bias)
            if y is not None:
                return y.view(*x.shape[:-1], self.out_features)
            y = torch.ops.aten._weight_int8pack_mm(row, self.quantized["q8"], self.quantized["scale"])
        else:
            q = self.quantized
            y = native.gemv_q4(row, q["q4"], q["scale"], q["lo"], self.group, self.bias)
            if y is not None:
                return y.view(*x.shape[:-1], self.out_features)
            if self.torch_w4 is None:  # made once, only where vlmkit's kernel is unavailable
                self.torch_w4 = _torch_w4(q)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(row, self.torch_w4[0], self.group, self.torch_w4[1])
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, one-row calls {self.scheme} ({WEIGHT_ONLY[self.scheme]})"
