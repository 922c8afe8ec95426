"""Run a model's vision side in another dtype than its text model: :func:`set_vision_dtype`.

The vision tower is bound by matmul FLOP/s (``docs/speed.md``): in float32 vlmkit already
reaches the CPU's measured float32 matmul speed, so only cheaper arithmetic encodes a tile
faster. On CPUs with bfloat16 units (``avx512_bf16``, ``amx_bf16``) a bfloat16 tower runs its
matmuls at about twice the float32 rate or more, while decode, which reads weights rather than
computing, gains nothing from bfloat16 and stays float32 (and keeps vlmkit's native decode step).

:func:`set_vision_dtype` casts the vision slots (:data:`VISION_SLOTS`: tower, connector,
aligner) in place; :meth:`vlmkit.model.VLM.encode_images` feeds the tower pixels in its dtype
and hands the visual tokens to the text model in the text model's dtype. It is an accuracy
trade like int8: measured on the bench's real checkpoint (docs/speed.md), the visual tokens of a bfloat16
tower differ from float32's by ~1% (relative norm).

:data:`INT8` instead makes the tower's linear layers W8A8 int8 (as ``w8a8`` does), leaving the
text model as it is: on CPUs with int8 dot products (VNNI / AMX) a tile encodes in ~0.4x the
float32 time (visual tokens ~2.6% off), beside a float32 or weight-only ``w8`` / ``w4`` text
model that keeps its native decode step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .builder import resolve_dtype
from .errors import SpecError, VlmkitError
from .quantize import Int8Linear
from .scheme_choice import cpu_flags

__all__ = ["VISION_SLOTS", "BF16_FLAGS", "INT8", "check_vision_dtype", "vision_dtype_name", "set_vision_dtype",
           "has_bf16_units"]  # fmt: skip

log = logging.getLogger(__name__)

#: the slots that run before the visual tokens reach the text model
VISION_SLOTS = ("vision_tower", "connector", "aligner")
#: CPU flags of bfloat16 matmul units
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: the vision side in int8: the tower's linear layers as ``w8a8`` makes them (int8 weights and
#: dynamically quantized int8 activations), fast where the CPU has int8 dot products (VNNI/AMX)
INT8 = "int8"
_INT8_NAMES = {"int8", "w8a8", "torch.int8"}


def has_bf16_units(flags: dict[str, Any] | None = None) -> bool:
    """Whether the CPU (``flags``: a :func:`~vlmkit.scheme_choice.cpu_flags` dict) has bfloat16 units."""
    flags = flags if flags is not None else cpu_flags()
    return any(f in flags.get("flags", ()) for f in BF16_FLAGS)


def check_vision_dtype(dtype: torch.dtype | str, device: torch.device | str = "cpu") -> torch.dtype:
    """``dtype`` (a float ``torch.dtype`` or its name, e.g. ``"bfloat16"``, ``"bf16"``) as a
    ``torch.dtype``; a :class:`~vlmkit.errors.VlmkitError` naming the valid names otherwise.
    Needs no model, so a command can check its option before anything loads."""
    try:
        return resolve_dtype(dtype, torch.device(device))
    except SpecError as exc:  # names the valid dtypes
        raise VlmkitError(f"vision dtype {dtype!r}: {exc.detail}", hint="e.g. 'bfloat16' or 'float32'") from None


def _is_int8(dtype: Any) -> bool:
    return dtype is torch.int8 or (isinstance(dtype, str) and dtype in _INT8_NAMES)


def vision_dtype_name(dtype: torch.dtype | str) -> str:
    """The canonical name of a vision dtype: :data:`INT8` (``"int8"``, ``"w8a8"``,
    ``torch.int8``) or a float dtype's (``"bf16"`` -> ``"bfloat16"``); a
    :class:`~vlmkit.errors.VlmkitError` naming the choices otherwise. Needs no model."""
    if _is_int8(dtype):
        return INT8
    try:
        return str(check_vision_dtype(dtype)).removeprefix("torch.")
    except VlmkitError as exc:
        raise VlmkitError(f"{exc.message}; or 'int8' (w8a8 vision layers)", hint=exc.hint) from None


def set_vision_dtype(model: nn.Module, dtype: torch.dtype | str, *, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cast ``model``'s :data:`VISION_SLOTS` to ``dtype`` (a float dtype or its name, e.g.
    ``"bfloat16"``) in place, or with :data:`INT8` make the tower's linear layers W8A8 int8 (what
    ``quantize(model, "w8a8")`` does to it; the text model is left as it is, float32 or ``w8`` /
    ``w4``). Returns ``{"dtype", "slots", "bf16_units", "note"}``; ``note`` warns when the CPU
    lacks the units that make that dtype fast (bfloat16 units; int8 dot products for ``int8``).

    Raises :class:`~vlmkit.errors.VlmkitError` for a model without those slots, an unknown
    dtype, a float dtype for an int8 (W8A8) vision tower, or ``int8`` for a non-float32 one."""
    slots = [s for s in VISION_SLOTS if isinstance(getattr(model, s, None), nn.Module)]
    if "vision_tower" not in slots:
        raise VlmkitError("the model has no vision_tower slot", hint="pass a vlmkit VLM (vlmkit.build_from_hf)")
    params = [p for s in slots for p in getattr(model, s).parameters()]
    int8 = any(isinstance(m, Int8Linear) for s in slots for m in getattr(model, s).modules())
    if _is_int8(dtype):
        return _int8_vision(model, int8, flags)
    if int8:
        raise VlmkitError("the vision side is int8-quantized (w8a8): its dtype cannot change",
                          hint="set the vision dtype on a float model, before quantize(..., 'w8a8')")  # fmt: skip
    device = params[0].device if params else torch.device("cpu")
    target = check_vision_dtype(dtype, device)
    for slot in slots:
        getattr(model, slot).to(target)
    bf16 = has_bf16_units(flags) if device.type == "cpu" else None
    note = ""
    if target == torch.bfloat16 and device.type == "cpu" and not bf16:
        note = ("this CPU has no bfloat16 units (avx512_bf16 / amx_bf16): a bfloat16 vision tower runs slower "
                "than float32 here")  # fmt: skip
        log.warning("vision dtype: %s", note)
    return {"dtype": str(target).removeprefix("torch."), "slots": slots, "bf16_units": bf16, "note": note}


def _int8_vision(model: nn.Module, already: bool, flags: dict[str, Any] | None) -> dict[str, Any]:
    """:data:`INT8` for :func:`set_vision_dtype`: ``quantize_int8`` on the tower alone, keeping
    what ``model.quantized`` says about the text model (a no-op, said in ``note``, when the tower
    is int8 already)."""
    from .quantize import quantize_int8
    from .scheme_choice import has_int8_dot

    dot = has_int8_dot(flags)
    if already:
        return {"dtype": INT8, "slots": ["vision_tower"], "bf16_units": None, "int8_dot": dot,
                "note": "the vision tower is int8 (w8a8) already"}  # fmt: skip
    before = getattr(model, "quantized", None)
    quantize_int8(model, slots=("vision_tower",))  # checks: float32, CPU, torch's quantized kernels
    model.quantized = before  # the text model's scheme, unchanged
    note = ""
    if not dot:
        note = "this CPU has no int8 dot products (VNNI / AMX): an int8 vision tower runs slower than float32 here"
        log.warning("vision dtype: %s", note)
    return {"dtype": INT8, "slots": ["vision_tower"], "bf16_units": None, "int8_dot": dot, "note": note}
