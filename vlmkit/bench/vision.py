"""The vision-dtype section of ``vlmkit bench``: vlmkit's vision side in bfloat16 and in int8
(:func:`vlmkit.vision_dtype.set_vision_dtype`; the text model stays float32) against vlmkit's
float32 tower and transformers' float32 one, alternated; plus how far its visual tokens move.
Each dtype runs only where this CPU has the units that make it fast (bfloat16 units; int8 dot
products), and says why it was skipped otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .measure import Metric, alternate, timed
from .prompts import Prompt
from .sides import VlmkitSide

#: the issue's bound on vlmkit's vision time per tile over transformers'
VISION_GOAL = 0.70
#: untimed calls per side before the timed ones
WARMUP = 3
#: the vision dtypes timed: name -> the short label of its rows
DTYPES = {"bfloat16": "bf16", "int8": "int8"}


def _why_not(dtype: str) -> str | None:
    """Why ``dtype`` is not timed on this CPU (None: it is)."""
    from ..scheme_choice import INT8_DOT_FLAGS, has_int8_dot
    from ..vision_dtype import BF16_FLAGS, has_bf16_units

    if dtype == "bfloat16" and not has_bf16_units():
        return f"this CPU has none of {', '.join(BF16_FLAGS)}: a bfloat16 tower would be slower than float32"
    if dtype == "int8" and not has_int8_dot():
        return f"this CPU has none of {', '.join(INT8_DOT_FLAGS)}: an int8 tower would be slower than float32"
    return None


def vision_dtype_section(folder: Path, sides: dict[str, Any], p1: Prompt, repeats: int) -> dict[str, Any]:
    """``{dtype: figures}`` for each of :data:`DTYPES`: one tile through that tower, vlmkit float32
    (``vlmkit``) and transformers float32 (``transformers``), alternated; JSON-ready. Each dtype
    has an alternation of its own (an int8 tower timed right after a bfloat16 one ran ~1.4x
    slower than after float32 on an AMD EPYC). A dtype this CPU runs slower than float32 is
    ``{"skipped": why}``."""
    out: dict[str, Any] = {}
    for dtype in DTYPES:
        why = _why_not(dtype)
        out[dtype] = {"skipped": why} if why else _one_dtype(folder, sides, p1, repeats, dtype)
    return out


def _one_dtype(folder: Path, sides: dict[str, Any], p1: Prompt, repeats: int, dtype: str) -> dict[str, Any]:
    """One vision dtype's figures: its side (loaded fresh, then cast), alternated with both float32 sides."""
    import torch

    from ..vision_dtype import set_vision_dtype

    label, side = DTYPES[dtype], VlmkitSide(folder)
    side.load()
    report = set_vision_dtype(side.model, dtype)
    every = {label: side, "vlmkit": sides["vlmkit"], "transformers": sides["transformers"]}
    metric = Metric(f"vision_{label}", "vision encode, 1 tile", "ms/tile", False, VISION_GOAL)
    # three warm-up calls each: an int8 tower's first calls run 1.4-3x slower than its later ones
    # (weights packed on first use, then the allocator settling on its large activation buffers)
    alternate(metric, {s: timed(lambda s=s: every[s].encode(p1), 1e3 / p1.tiles) for s in every}, repeats, warmup=WARMUP)
    pixels, mask = p1.tensors["pixel_values"], p1.tensors.get("pixel_attention_mask")
    with torch.inference_mode():
        want = sides["vlmkit"].model.encode_images(pixels, mask)[0]
        got = side.model.encode_images(pixels, mask)[0]
    return {
        "label": label,
        "report": report,
        "vs_transformers": metric.as_dict(label, "transformers"),
        "vs_fp32": {**metric.as_dict(label, "vlmkit"), "goal": None, "met": None},
        "token_rel_err": float((got - want).norm() / want.norm()),
    }
