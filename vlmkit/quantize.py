"""Opt-in int8 inference on CPUs: dynamic quantization of the linear layers.

:func:`quantize_int8` swaps every :class:`torch.nn.Linear` of the chosen slots (default: the text
``backbone`` and the ``vision_tower``) for an :class:`Int8Linear`, except the LM head, which stays
float32 unless ``quantize_head=True``:

* weights are stored as int8, symmetric, one scale per output channel (4x less memory than
  float32, so a decode step reads 4x fewer bytes);
* activations are quantized to 8 bits on the fly, each token (row) with its own scale and zero
  point, and the product runs in the CPU's int8 kernels (fbgemm / oneDNN for one row, i.e. a
  decode step; ``torch._int_mm`` for prompts and image patches) with a float32 result.

This is an *approximation*: logits move by a few percent of their range and greedy decoding may
pick another token where two are nearly tied (``vlmkit bench --int8`` reports both). Embeddings,
norms, attention, the patch-embedding convolution, the connector and (by default) the LM head stay
float32. The head is kept because it is where one int8 scale per row costs most: on SmolLM2-135M
weights an int8 head lowers the share of prompts whose greedy continuation matches float32
(8/24 against 12-15/24 with a float32 head, depending on the calibration draw) for ~20% more
decode speed (2.06x float32 against 1.65-1.90x, measured by ``vlmkit bench --int8``).

A quantized model is for inference on the CPU only: it cannot be trained, saved with
``save_pretrained`` or moved to a GPU -- keep (or rebuild) the float32 model for those.

>>> model = vlmkit.build_from_hf(folder)          # doctest: +SKIP
>>> quantize_int8(model)                          # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .decode_layout import GemvLinear
from .errors import VlmkitError

__all__ = ["Int8Linear", "int8_targets", "check_quantizable", "quantize_int8", "int8_available", "cpu_has_vnni", "DEFAULT_SLOTS"]

#: The slots :func:`quantize_int8` quantizes by default.
DEFAULT_SLOTS = ("backbone", "vision_tower")


def int8_available() -> bool:
    """True when this torch build has the quantized CPU linear kernels."""
    try:
        return bool(torch.backends.quantized.supported_engines) and hasattr(torch.ops.quantized, "linear_dynamic")
    except (AttributeError, RuntimeError):
        return False


def cpu_has_vnni() -> bool:
    """Whether this CPU has an int8 dot-product instruction (AVX512-VNNI / AVX-VNNI) torch uses.

    Without it (AVX2-only CPUs) the one-row int8 kernel multiplies pairs into 16 bits, which can
    saturate on 8-bit activations; torch then quantizes activations to 7 bits.
    """
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    try:
        return bool(callable(is_vnni) and is_vnni())
    except RuntimeError:
        return False


def _row_sums(qweight: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` int8 -> ``(out,)`` float32 row sums, exact: summed in float32 (about twice as
    fast as an int32 sum here) while ``127 * in`` stays below 2**24, where every partial sum is an
    integer float32 holds exactly; in int32 beyond."""
    if 127 * qweight.shape[1] < 2**24:
        return qweight.to(torch.float32).sum(dim=1)
    return qweight.sum(dim=1, dtype=torch.int32).to(torch.float32)


def _reduce_range() -> bool:
    """7-bit activations on CPUs whose int8 dot product can saturate (no VNNI), as torch does."""
    return not cpu_has_vnni()


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` int8 per output channel and activations quantized per token.

    Built from a float32 weight with :meth:`from_linear` / :meth:`from_weight`; the float weight
    is not kept. ``forward`` takes float32 ``(..., in_features)`` and returns float32
    ``(..., out_features)``. Every row (token / patch) of the input gets its own 8-bit
    asymmetric scale: one row (a decode step) runs the packed kernel
    (``torch.ops.quantized.linear_dynamic``, which quantizes its whole input with one scale; the
    weight is packed for it at the first one-row call),
    several rows (a prompt, image patches) quantize row by row and run ``torch._int_mm`` -- a
    single scale over a whole prompt would let one outlier token (e.g. the first) flatten
    every other token's activations.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *, reduce_range: bool) -> None:
        super().__init__()
        self._packed: object | None = None  # the kernel's pre-packed weight and bias (a ScriptObject), on first use
        self.out_features, self.in_features = qweight.shape
        self.reduce_range = reduce_range
        self._qweight_t = qweight.t()  # (in, out) int8 view, for torch._int_mm
        self._scales = scales.to(torch.float32)  # (out,)
        self._colsum = _row_sums(qweight)  # (out,) float32, for zero points
        self._bias = bias
        #: bytes a one-row call reads: the packed int8 weight, its scales (and the bias)
        self.nbytes = qweight.numel() + 8 * self.out_features + (0 if bias is None else 4 * bias.numel())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Quantize a ``(out, in)`` float weight (and optional ``(out,)`` bias)."""
        weight = weight.detach().to(torch.float32).contiguous()  # a decode layout may store it transposed
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        qint = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls.from_quantized(qint, scales, bias)

    @classmethod
    def from_quantized(cls, qint: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """From ``(out, in)`` int8 values, their ``(out,)`` float32 scales and an optional
        ``(out,)`` bias (what :func:`from_weight` computes, e.g. read back from a cache). The
        one-row kernel's packed copy (``linear_prepack``, this CPU's layout) is made at the first
        one-row call: layers that only ever see several rows (the vision tower) never pay for it."""
        bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        return cls(qint.contiguous(), scales, bias, reduce_range=_reduce_range())

    def _pack(self) -> object:
        """The one-row kernel's packed weight and bias (made once)."""
        if self._packed is None:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch >= 2.10 flags quantized tensor creation as deprecated
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(self._qweight_t.t(), self._scales.to(torch.float64), zero, 0)
                self._packed = torch.ops.quantized.linear_prepack(qweight, self._bias)
        return self._packed

    def tensors(self) -> dict[str, torch.Tensor]:
        """What :meth:`from_quantized` needs: ``qweight`` ``(out, in)`` int8, ``scales`` ``(out,)``
        and, when the layer has one, ``bias`` ``(out,)``."""
        out = {"qweight": self._qweight_t.t().contiguous(), "scales": self._scales}
        return out if self._bias is None else {**out, "bias": self._bias}

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize an :class:`torch.nn.Linear`."""
        return cls.from_weight(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` float32 -> ``(..., out_features)`` float32."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1:
            y = torch.ops.quantized.linear_dynamic(rows, self._pack(), self.reduce_range)
        else:
            y = self._per_row(rows)
        return y.view(*lead, self.out_features)

    def _per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Each row quantized to int8 with its own scale and zero point; int8 x int8 -> int32.

        With ``reduce_range`` (CPUs without VNNI) rows get 7-bit levels, as the one-row kernel
        quantizes them there, so a token's result does not depend on how many rows it came with.
        """
        levels = 127.0 if self.reduce_range else 255.0
        lo = x.amin(dim=1, keepdim=True).clamp_(max=0.0)
        hi = x.amax(dim=1, keepdim=True).clamp_(min=0.0)
        step = (hi - lo).clamp_(min=1e-12) / levels
        zero = torch.round(-128.0 - lo / step)  # x ~ step * (q - zero), q in [-128, -128 + levels]
        q = torch.round(x / step).add_(zero).clamp_(-128, -128 + levels).to(torch.int8)
        acc = torch._int_mm(q, self._qweight_t).to(torch.float32)  # (M, out)
        y = acc.sub_(zero * self._colsum).mul_(step * self._scales)
        return y if self._bias is None else y.add_(self._bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, int8 activations per token"


def int8_targets(module: nn.Module, skip: frozenset[str] = frozenset(), prefix: str = "") -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """``(parent, attribute, dotted name, linear)`` of every plain ``nn.Linear`` below ``module``
    (the ones :func:`quantize_int8` swaps), except those whose dotted name (relative to
    ``module``, ``prefix`` prepended) is in ``skip``."""
    out = []
    for name, child in list(module.named_children()):
        full = prefix + name
        if full in skip:
            continue
        if isinstance(child, nn.Linear) and type(child).forward in (nn.Linear.forward, GemvLinear.forward):
            out.append((module, name, full, child))
        else:
            out.extend(int8_targets(child, skip, full + "."))
    return out


def _swap_linears(module: nn.Module, skip: frozenset[str] = frozenset()) -> int:
    """Replace every target of :func:`int8_targets` by an :class:`Int8Linear`; returns how many."""
    targets = int8_targets(module, skip)
    for parent, attr, _, linear in targets:
        setattr(parent, attr, Int8Linear.from_linear(linear))
    return len(targets)


def quantize_int8(
    model: nn.Module,
    slots: Iterable[str] = DEFAULT_SLOTS,
    *,
    smooth: bool = True,
    calibration: torch.Tensor | None = None,
    quantize_head: bool = False,
) -> nn.Module:
    """Quantize the linear layers of ``model``'s ``slots`` to int8, in place; returns ``model``.

    ``model`` is a :class:`~vlmkit.model.VLM` (or any module whose slots are attributes) in
    float32 on the CPU. The ``backbone``'s LM head (``lm_head``) stays float32 unless
    ``quantize_head``; then a tied head (``lm_head is None``, reusing ``embed_tokens.weight``) gets
    an int8 copy of that matrix, and the float32 embedding table stays for the token lookup.

    ``smooth`` (Llama-style backbones): before quantizing, SmoothQuant-style per-channel scales
    (alpha 0.5) move the activations' outlier channels into the weights -- folded exactly into
    the RMSNorm weights (q/k/v, gate/up, and the LM head when it is quantized) and the ``up`` rows
    (down projection) -- so 8-bit activations lose less. The scales come from one float32 pass
    over ``calibration`` (``(B, T)`` token ids; default: 4 x 64 fixed-seed random ids of the
    vocabulary).

    Raises :class:`~vlmkit.errors.VlmkitError` for another device or dtype, an unknown slot, or a
    torch without quantized kernels.
    """
    slots = (slots,) if isinstance(slots, str) else tuple(slots)
    check_quantizable(model, slots, calibration)
    with torch.no_grad():
        for slot in slots:
            _quantize_slot(getattr(model, slot), slot == "backbone", smooth=smooth, calibration=calibration,
                           quantize_head=quantize_head)  # fmt: skip
    model.quantized = "int8"
    return model


def check_quantizable(model: nn.Module, slots: tuple[str, ...], calibration: torch.Tensor | None) -> None:
    """Raise :class:`VlmkitError` unless ``slots`` of ``model`` can be quantized with ``calibration``."""
    if not int8_available():
        raise VlmkitError("this torch build has no quantized CPU kernels (torch.ops.quantized.linear_dynamic)",
                          hint="install a standard CPU build of torch, or run in float32")  # fmt: skip
    for slot in slots:
        if not isinstance(getattr(model, slot, None), nn.Module):
            raise VlmkitError(f"the model has no slot {slot!r} to quantize",
                              hint=f"choose among {', '.join(DEFAULT_SLOTS)}, 'connector', 'aligner'")  # fmt: skip
    if any(isinstance(m, Int8Linear) for slot in slots for m in getattr(model, slot).modules()):
        raise VlmkitError("the model is already quantized", hint="quantize a float32 model once")
    floats = [p for slot in slots for p in getattr(model, slot).parameters() if p.is_floating_point()]
    bad = {(p.device.type, p.dtype) for p in floats} - {("cpu", torch.float32)}
    if bad:
        where = ", ".join(sorted(f"{d} {str(t).removeprefix('torch.')}" for d, t in bad))
        raise VlmkitError(f"int8 quantization runs on float32 CPU models; these slots hold {where} parameters",
                          hint="build with dtype='float32' and device='cpu' (the defaults), then quantize")  # fmt: skip
    if calibration is not None and (not isinstance(calibration, torch.Tensor) or calibration.dim() != 2
                                    or calibration.is_floating_point()):  # fmt: skip
        raise VlmkitError("calibration must be a (batch, length) tensor of token ids", hint="e.g. processor(text=...)['input_ids']")


def _quantize_slot(component: nn.Module, is_backbone: bool, *, smooth: bool, calibration: torch.Tensor | None,
                   quantize_head: bool) -> None:  # fmt: skip
    """Smooth (a Llama-layout backbone) and swap ``component``'s linear layers; the backbone's
    ``lm_head`` only when ``quantize_head`` (a tied one becomes an int8 copy of the embedding)."""
    head = is_backbone and quantize_head
    head_scale = _smooth_llama(component, calibration, head=head) if is_backbone and smooth else None
    embed = getattr(component, "embed_tokens", None)
    tied = head and hasattr(component, "lm_head") and component.lm_head is None and isinstance(embed, nn.Embedding)
    _swap_linears(component, frozenset({"lm_head"}) if is_backbone and not head else frozenset())
    if tied:  # the tied head: an int8 copy of the (smoothed) embedding matrix
        weight = embed.weight if head_scale is None else embed.weight * head_scale
        component.lm_head = Int8Linear.from_weight(weight)


#: SmoothQuant's migration strength: 0.5 splits each outlier channel's range evenly between
#: activation and weight.
SMOOTH_ALPHA = 0.5


def _llama_layers(backbone: nn.Module) -> list[nn.Module] | None:
    """The decoder layers when ``backbone`` has vlmkit's Llama layout (fused qkv / gate_up)."""
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or not callable(getattr(backbone, "embed", None)):
        return None
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        ok = (
            isinstance(getattr(attn, "qkv_proj", None), nn.Linear)
            and isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear)
            and isinstance(getattr(mlp, "down_proj", None), nn.Linear)
            and isinstance(getattr(mlp, "intermediate_size", None), int)
            and isinstance(getattr(getattr(layer, "input_layernorm", None), "weight", None), torch.Tensor)
            and isinstance(getattr(getattr(layer, "post_attention_layernorm", None), "weight", None), torch.Tensor)
        )
        if not ok:
            return None
    return list(layers)


def _smooth_llama(backbone: nn.Module, calibration: torch.Tensor | None, *, head: bool = True) -> torch.Tensor | None:
    """Apply SmoothQuant scales to a Llama-layout backbone (no-op for other backbones); the final
    norm and the LM head only when ``head`` (the head is to be quantized too).

    Returns the scale to apply to a tied LM head's int8 copy (None when untied or not smoothed)."""
    layers = _llama_layers(backbone)
    if layers is None:
        return None
    if calibration is None:
        vocab = int(getattr(backbone, "vocab_size", 0) or backbone.embed_tokens.num_embeddings)
        calibration = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    head_module = getattr(backbone, "lm_head", None)
    head_weight = head_module.weight if isinstance(head_module, nn.Linear) else None
    if head_module is None and isinstance(getattr(backbone, "embed_tokens", None), nn.Embedding):
        head_weight = backbone.embed_tokens.weight
    norm = getattr(backbone, "norm", None)
    with_head = head and isinstance(getattr(norm, "weight", None), torch.Tensor) and head_weight is not None
    amax = _activation_amax(backbone, layers, calibration.to(torch.long), norm if with_head else None)
    for i, layer in enumerate(layers):
        _smooth_layer(layer, amax, i)
    if not with_head:
        return None
    s = _smooth_scale(amax["head"], head_weight)
    _replace(norm, "weight", norm.weight / s)
    if isinstance(head_module, nn.Linear):
        _replace(head_module, "weight", head_module.weight * s)
        return None
    return s


def _activation_amax(backbone: nn.Module, layers: list[nn.Module], calibration: torch.Tensor,
                     norm: nn.Module | None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-input-channel ``max |x|`` of every projection's input (``"{i}.qkv"``, ``"{i}.gate_up"``,
    ``"{i}.down"``) and, given the final ``norm``, of the LM head's (``"head"``), over one float32
    pass of ``calibration`` ``(B, T)`` ids."""
    amax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        seen = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0)
        amax[name] = seen if name not in amax else torch.maximum(amax[name], seen)

    hooks = []
    for i, layer in enumerate(layers):
        for name, module in ((f"{i}.qkv", layer.self_attn.qkv_proj), (f"{i}.gate_up", layer.mlp.gate_up_proj),
                             (f"{i}.down", layer.mlp.down_proj)):  # fmt: skip
            hooks.append(module.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0])))
    if norm is not None:
        hooks.append(norm.register_forward_hook(lambda _m, _args, out: record("head", out)))
    try:
        with torch.inference_mode():
            backbone(backbone.embed(calibration))
    finally:
        for h in hooks:
            h.remove()
    return amax


def _smooth_scale(act_amax: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s = amax(x)^a / amax(W)^(1-a)`` for a ``(out, in)`` weight."""
    act = act_amax.clamp(min=1e-5)
    w = weight.abs().amax(dim=0).clamp(min=1e-5)
    return (act.pow(SMOOTH_ALPHA) / w.pow(1 - SMOOTH_ALPHA)).clamp(min=1e-5)


def _smooth_layer(layer: nn.Module, amax: dict[str, torch.Tensor], i: int) -> None:
    """Fold the scales of decoder layer ``i`` exactly: ``W * s`` with the input divided by ``s``
    (in the RMSNorm weight before q/k/v and gate/up; in the ``up`` rows before ``down``)."""
    qkv, gate_up, down = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj
    s = _smooth_scale(amax[f"{i}.qkv"], qkv.weight)
    _replace(qkv, "weight", qkv.weight * s)
    _replace(layer.input_layernorm, "weight", layer.input_layernorm.weight / s)
    s = _smooth_scale(amax[f"{i}.gate_up"], gate_up.weight)
    _replace(gate_up, "weight", gate_up.weight * s)
    _replace(layer.post_attention_layernorm, "weight", layer.post_attention_layernorm.weight / s)
    s = _smooth_scale(amax[f"{i}.down"], down.weight)
    _replace(down, "weight", down.weight * s)
    up_rows = gate_up.weight.clone()
    up_rows[layer.mlp.intermediate_size :] /= s[:, None]  # act(gate) * (up / s) == (act(gate) * up) / s
    _replace(gate_up, "weight", up_rows)


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Give ``module`` a new parameter ``name`` (never writes into the old one, which may be shared)."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.detach().contiguous(), requires_grad=old.requires_grad))
