"""The vision-dtype section of ``vlmkit bench``: vlmkit's vision tower in bfloat16
(:func:`vlmkit.vision_dtype.set_vision_dtype`, the text model stays float32) against vlmkit's
float32 tower and transformers' float32 one, alternated; plus how far its visual tokens move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .measure import Metric, alternate, timed
from .prompts import Prompt
from .sides import VlmkitSide

#: the issue's bound on vlmkit's vision time per tile over transformers'
VISION_GOAL = 0.70


def vision_dtype_section(folder: Path, sides: dict[str, Any], p1: Prompt, repeats: int) -> dict[str, Any]:
    """Time one tile through a bfloat16 tower (``bf16``), vlmkit float32 (``vlmkit``) and
    transformers float32 (``transformers``); JSON-ready. Where the CPU has no bfloat16 units the
    section is skipped and says so (a bfloat16 tower is slower than float32 there)."""
    import torch

    from ..vision_dtype import BF16_FLAGS, has_bf16_units, set_vision_dtype

    if not has_bf16_units():
        return {"skipped": f"this CPU has none of {', '.join(BF16_FLAGS)}: a bfloat16 tower would be slower than float32"}
    bf16 = VlmkitSide(folder)
    bf16.load()
    report = set_vision_dtype(bf16.model, "bfloat16")
    every = {"bf16": bf16, "vlmkit": sides["vlmkit"], "transformers": sides["transformers"]}
    metric = Metric("vision_bf16", "vision encode, 1 tile", "ms/tile", False, VISION_GOAL)
    alternate(metric, {s: timed(lambda s=s: every[s].encode(p1), 1e3 / p1.tiles) for s in every}, repeats)
    pixels, mask = p1.tensors["pixel_values"], p1.tensors.get("pixel_attention_mask")
    with torch.inference_mode():
        want = sides["vlmkit"].model.encode_images(pixels, mask)[0]
        got = bf16.model.encode_images(pixels, mask)[0]
    drift = float((got - want).norm() / want.norm())
    return {
        "report": report,
        "vs_transformers": metric.as_dict("bf16", "transformers"),
        "vs_fp32": {**metric.as_dict("bf16", "vlmkit"), "goal": None, "met": None},
        "token_rel_err": drift,
    }
