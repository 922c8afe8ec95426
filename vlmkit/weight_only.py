"""Weight-only int8 / int4 linear layers for one-row decode on the CPU (activations stay float32).

:class:`WeightOnlyLinear` keeps the layer's float32 weight for prompts, image patches and batched
rows (so prefill and vision are never slower than float32) and a quantized copy for one-row calls
(a decode step), which read 4x (int8) or ~8x (int4) fewer bytes:

* ``w8``: int8, symmetric, one float32 scale per :data:`W8_GROUP` inputs (llama.cpp's Q8_0
  grouping, whose scales are float16: 36 bytes per 32 weights against its 34, for one more of
  the 24 greedy-agreement prompts, 22 against 21, on SmolLM2); vlmkit's own kernel (:func:`vlmkit.native.gemv_i8`) where
  it compiled, else a float32 matmul on the copy widened per call (slow: torch has no group-wise
  int8 kernel);
* ``w4``: int4, asymmetric, one float16 scale and minimum per :data:`W4_GROUP` inputs (Q4_1's
  grouping; 20 bytes per 32 weights); vlmkit's own kernel (:func:`vlmkit.native.gemv_q4`), else
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on a copy repacked for it at the first call.
  The LM head gets ``w8`` (:data:`HEAD_SCHEME`).

Group-wise scales keep greedy continuations close to float32 (SmolLM2, 24 prompts x 16 tokens:
one scale per output channel 17/24 identical, per 32 inputs 22/24). The float weight stays, so
memory grows by the quantized copy (+28% for ``w8``, +~16% for ``w4``). Whether these kernels
beat float32 depends on the CPU: :mod:`vlmkit.scheme_choice`
times them on the model's own weights (:func:`vlmkit.quant_schemes.quantize`, scheme ``auto``).
Shapes: ``x`` ``(..., in)`` -> ``(..., out)``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import native
from .decode_layout import linear_rows
from .errors import VlmkitError

__all__ = ["WeightOnlyLinear", "WEIGHT_ONLY", "FORMAT", "W8_GROUP", "W4_GROUP", "HEAD_SCHEME",
           "quantize_w8", "quantize_w4", "unpack_w4", "dequantize", "w8_group", "w4_group"]

#: The weight-only schemes and what their quantized copy holds.
WEIGHT_ONLY = {"w8": "int8, float32 scale per 32 inputs", "w4": "int4, float16 scale and minimum per 32 inputs"}
#: The layout of the quantized copies (part of the on-disk cache key: a new layout is a new file).
#: 2: scales per 32 inputs, float32 for ``w8``, float16 for ``w4`` (1: float32, per output channel for ``w8``).
FORMAT = 2
#: Inputs per int8 scale (as llama.cpp's Q8_0); a layer whose ``in_features`` it does not divide
#: gets one scale per output channel.
W8_GROUP = 32
#: Inputs per int4 scale and minimum (as Q4_1); a layer whose ``in_features`` it does not divide
#: stays float32.
W4_GROUP = 32
#: The LM head's scheme where it differs from the layers': int4 keeps the head at int8, as
#: llama.cpp's 4-bit files keep their output matrix at 6-8 bits (on SmolLM2 an int4 head alone
#: takes greedy agreement from 24/24 to 4/24 prompts; docs/speed.md).
HEAD_SCHEME = {"w4": "w8"}
#: float16's largest finite value: a scale or minimum beyond it cannot be stored
_HALF_MAX = 65504.0
#: the smallest scale stored (float16's smallest subnormal), so an all-zero group divides by it
_HALF_TINY = 2.0**-24


def w8_group(in_features: int) -> int:
    """The int8 group size for ``in_features`` inputs: :data:`W8_GROUP`, or the whole row."""
    return W8_GROUP if in_features % W8_GROUP == 0 else in_features


def w4_group(in_features: int) -> int | None:
    """The int4 group size for ``in_features`` (None when :data:`W4_GROUP` does not divide it)."""
    return W4_GROUP if in_features % W4_GROUP == 0 else None


def _half(t: torch.Tensor, what: str, weight: torch.Tensor) -> torch.Tensor:
    """``t`` (derived from ``weight``) as float16, refusing values float16 cannot hold (rather than storing inf)."""
    big = float(t.abs().max()) if t.numel() else 0.0
    if not big <= _HALF_MAX:
        largest = float(weight.abs().max())
        raise VlmkitError(f"weights up to {largest:.3g} give an int4 {what} of {big:.3g}, beyond float16's {_HALF_MAX:g}",
                          hint="these weights are too large for w4's float16 scales: quantize with w8, or keep float32 (fp32)")  # fmt: skip
    return t.to(torch.float16).contiguous()


def quantize_w8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(out, in)`` float -> ``{"q8": (out, in) int8, "scale": (out, in // group) float32}``,
    symmetric, ``group`` = :func:`w8_group`: ``w ~ q8 * scale`` per group, ``q8`` in -127..127."""
    w = weight.detach().to(torch.float32)
    out, inp = w.shape
    g = w.reshape(out, -1, w8_group(inp))
    scale = (g.abs().amax(-1) / 127.0).clamp(min=1e-12).contiguous()
    q = torch.round(g / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return {"q8": q.reshape(out, inp).contiguous(), "scale": scale}


def quantize_w4(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """``(out, in)`` float -> ``{"q4": (out, in // 2) uint8, "scale", "lo": (out, in // group) float16}``
    with ``w ~ q * scale + lo``, ``q`` in 0..15, per group of ``group`` inputs (a multiple of 32).
    Per block of 32 inputs byte ``j`` holds ``q[j] | q[j + 16] << 4`` (:func:`vlmkit.native.gemv_q4`)."""
    w = weight.detach().to(torch.float32)
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    lo = _half(g.amin(-1), "minimum", w)
    scale = _half(((g.amax(-1) - lo.float()) / 15.0).clamp(min=_HALF_TINY), "scale", w)
    q = torch.round((g - lo.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(out, inp // 32, 2, 16)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(out, inp // 2).contiguous()
    return {"q4": packed, "scale": scale, "lo": lo}


def unpack_w4(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``(out, in)`` int32 values ``q`` (0..15) of :func:`quantize_w4`'s ``q4``."""
    packed = tensors["q4"]
    out = packed.shape[0]
    b = packed.reshape(out, -1, 1, 16)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(out, -1).to(torch.int32)


def dequantize(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``(out, in)`` float32 weight a ``w8`` (``q8``) or ``w4`` (``q4``) copy stands for."""
    if "q8" in tensors:
        q, scale, lo = tensors["q8"].to(torch.float32), tensors["scale"], None
    else:
        q, scale, lo = unpack_w4(tensors).to(torch.float32), tensors["scale"], tensors["lo"]
    out, inp = q.shape
    w = q.reshape(out, scale.shape[1], -1) * scale.float()[..., None]
    if lo is not None:
        w = w + lo.float()[..., None]
    return w.reshape(out, inp)


def _torch_w4(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's packed int4 weight and ``(groups, out, 2)`` scale/zero for the same values
    (``_weight_int4pack_mm_for_cpu`` computes ``(q - 8) * scale + zero``)."""
    scale, lo = tensors["scale"].float(), tensors["lo"].float()
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
        new.group = w4_group(linear.in_features) if scheme == "w4" else w8_group(linear.in_features)
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
            # torch has no group-wise int8 kernel: without vlmkit's, the copy is widened per call
            y = row @ dequantize(self.quantized).t()
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
