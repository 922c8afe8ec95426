"""Run a model's vision side in another float dtype than its text model: :func:`set_vision_dtype`.

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

__all__ = ["VISION_SLOTS", "BF16_FLAGS", "check_vision_dtype", "set_vision_dtype", "has_bf16_units"]

log = logging.getLogger(__name__)

#: the slots that run before the visual tokens reach the text model
VISION_SLOTS = ("vision_tower", "connector", "aligner")
#: CPU flags of bfloat16 matmul units
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


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


def set_vision_dtype(model: nn.Module, dtype: torch.dtype | str, *, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cast ``model``'s :data:`VISION_SLOTS` to ``dtype`` (a float dtype or its name, e.g.
    ``"bfloat16"``) in place. Returns ``{"dtype", "slots", "bf16_units", "note"}``; ``note`` warns
    when a bfloat16 tower runs on a CPU without bfloat16 units (slower than float32 there).

    Raises :class:`~vlmkit.errors.VlmkitError` for a model without those slots, a non-float or
    unknown dtype, or an int8 (W8A8) vision tower."""
    slots = [s for s in VISION_SLOTS if isinstance(getattr(model, s, None), nn.Module)]
    if "vision_tower" not in slots:
        raise VlmkitError("the model has no vision_tower slot", hint="pass a vlmkit VLM (vlmkit.build_from_hf)")
    params = [p for s in slots for p in getattr(model, s).parameters()]
    if any(isinstance(m, Int8Linear) for s in slots for m in getattr(model, s).modules()):
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
