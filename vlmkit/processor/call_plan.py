"""From a call's checked keywords (:func:`vlmkit.processor.options.resolve_call_options`) to what the
processor does: token options, the image settings of this call, the tiling knobs and the output form.

Per-call image keywords override the checkpoint's ``preprocessor_config.json`` values for one call;
a keyword that the model cannot take (a tile size other than its tower's, a different number of
image tokens per tile) is refused here, naming the value the checkpoint fixes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ProcessorError
from .image import ImageSettings
from .options import CALL_KEYWORDS, GROUPS
from .tokens import TokenOptions

__all__ = ["IMAGE_SETTING_KEYWORDS", "CallPlan", "check_image_keywords", "plan_call"]

#: The per-call image keywords that override one image setting for one call (transformers' names).
IMAGE_SETTING_KEYWORDS = ("do_convert_rgb", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
                          "image_mean", "image_std")  # fmt: skip
#: image keyword -> ImageSettings field it overrides for one call.
_SETTING_FIELDS = {**{k: k for k in IMAGE_SETTING_KEYWORDS}, "image_mean": "mean", "image_std": "std"}


@dataclass(frozen=True)
class CallPlan:
    """Everything one call decided: ``settings`` are this call's image settings (the tiled
    :class:`ImageSettings`, or those of the family's own image processing)."""

    tokens: TokenOptions
    settings: Any
    split: bool
    longest_edge: int
    max_visual_tokens: int | None
    return_tensors: str | None
    device: Any = None


def _fixed(name: str, value: int | None, fixed: int, why: str) -> None:
    if value is not None and value != fixed:
        raise ProcessorError(f"{name}={value} is not supported: {why} ({fixed})", hint=f"drop {name}, or pass {fixed}")


def _longest_edge(opts: Mapping[str, Any], default: int) -> int:
    size, longest = opts.get("size"), opts.get("longest_edge")
    if size is not None and longest is not None and size != longest:
        raise ProcessorError(
            f"size={{'longest_edge': {size}}} and longest_edge={longest} disagree", hint="pass one of them"
        )
    return next((v for v in (longest, size) if v is not None), default)


def image_plan(opts: Mapping[str, Any], settings: ImageSettings, image_seq_len: int) -> tuple[ImageSettings, bool, int]:
    """``(settings, split, longest_edge)`` of one call from its image keywords."""
    _fixed("max_image_size['longest_edge']", opts.get("max_image_size"), settings.tile,
           "the vision tower takes tiles of exactly its image size in pixels")  # fmt: skip
    for name in ("image_seq_len", "image_seq_length"):
        _fixed(name, opts.get(name), image_seq_len, "the model turns each tile into the checkpoint's number of tokens")
    updates = {field: opts[key] for key, field in _SETTING_FIELDS.items() if opts.get(key) is not None}
    call_settings = dataclasses.replace(settings, **updates) if updates else settings
    split = opts.get("do_image_splitting")
    return call_settings, settings.do_image_splitting if split is None else split, _longest_edge(opts, settings.longest_edge)


def check_image_keywords(options: Mapping[str, Any], accepted: frozenset[str]) -> None:
    """Refuse, by name, every image keyword in ``options`` (flat or nested, as the user passed
    them) that a family's own image processing does not take (``accepted``)."""
    names = [k for k in options if k not in GROUPS]
    names += [k for g in GROUPS if isinstance(options.get(g), Mapping) for k in options[g]]
    for name in names:
        kw = CALL_KEYWORDS.get(name)
        if kw is not None and kw.group == "images" and name not in accepted:
            raise ProcessorError(
                f"{name} is not supported: this checkpoint's image processor does not take it",
                hint=f"drop {name}; the image keywords it takes: {', '.join(sorted(accepted))}",
            )


def plan_call(
    opts: Mapping[str, Any],
    settings: ImageSettings,
    *,
    image_seq_len: int,
    padding_side: str,
    max_visual_tokens: int | None,
    image_processing: Any = None,
) -> CallPlan:
    """The :class:`CallPlan` of one call; vlmkit's defaults: padding on, ``return_tensors='pt'``.

    With a family's ``image_processing`` (:class:`vlmkit.family.ImageProcessing`) the call's
    settings are its :meth:`~vlmkit.family.ImageProcessing.call_settings`, with no splitting."""
    truncation = bool(opts.get("truncation") or False)
    padding = opts.get("padding", "longest")
    if opts.get("max_length") is not None and not truncation and padding != "max_length":
        raise ProcessorError(
            f"max_length={opts['max_length']} was passed without truncation=True or padding='max_length', so it "
            "would do nothing",
            hint="add truncation=True (cut longer prompts) and/or padding='max_length' (pad shorter ones)",
        )
    tokens = TokenOptions(
        padding=padding,
        truncation=truncation,
        max_length=opts.get("max_length"),
        pad_to_multiple_of=opts.get("pad_to_multiple_of"),
        padding_side=opts.get("padding_side") or padding_side,
        add_special_tokens=opts.get("add_special_tokens", True),
        return_attention_mask=opts.get("return_attention_mask") is not False,
        return_token_type_ids=bool(opts.get("return_token_type_ids")),
        return_length=bool(opts.get("return_length")),
        return_mm_token_type_ids=bool(opts.get("return_mm_token_type_ids")),
        return_special_tokens_mask=bool(opts.get("return_special_tokens_mask")),
        return_offsets_mapping=bool(opts.get("return_offsets_mapping")),
    )
    if image_processing is None:
        call_settings, split, longest = image_plan(opts, settings, image_seq_len)
    else:  # a family's own image processing: no tiling knobs
        call_settings, split, longest = image_processing.call_settings(opts), False, 0
    limit = opts.get("max_visual_tokens", max_visual_tokens)
    return CallPlan(tokens, call_settings, split, longest, limit, opts.get("return_tensors", "pt"), opts.get("device"))
