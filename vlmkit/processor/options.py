"""One table of the keywords ``Processor.__call__`` accepts, where each belongs, and how nesting resolves.

transformers' processors take their options flat (``padding=True``) or nested by modality
(``text_kwargs={...}``, ``images_kwargs={...}``, ``common_kwargs={...}``). :func:`resolve_call_options`
flattens them once, at the public entry: every keyword is either

- **accepted**: its value is checked and normalized by the check in :data:`CALL_KEYWORDS`, or
- **refused**: a :class:`ProcessorError` names it and says why (and what to do instead); a
  refused keyword whose value is transformers' no-op default (``stride=0``, ``do_pad=True``...)
  is let through, since it changes nothing.

An unknown keyword is an error naming the closest valid one. Other branches extend the table with
:func:`add_keywords` (for example video keywords, in their own group).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ProcessorError, closest, short_repr
from . import option_checks as oc

__all__ = ["CALL_KEYWORDS", "GROUPS", "Keyword", "add_keywords", "resolve_call_options"]

_NOT_GIVEN = object()


@dataclass(frozen=True)
class Keyword:
    """One keyword: its ``group`` ('text', 'images' or 'common'), the ``check`` that normalizes an
    accepted value, or ``refused`` (why not) with ``no_op`` values that are let through."""

    name: str
    group: str
    check: Callable[[str, Any], Any] | None = None
    refused: str | None = None
    no_op: tuple[Any, ...] = (None,)

    def resolve(self, value: Any) -> Any:
        if self.refused is None:
            return self.check(self.name, value) if self.check else value
        if any(value is v or (type(value) is type(v) and value == v) for v in self.no_op):
            return _NOT_GIVEN
        raise ProcessorError(f"{self.name}={short_repr(value)} is not supported: {self.refused}")


#: nesting keyword -> the group whose keywords it may hold (None: any group).
GROUPS: dict[str, str | None] = {"text_kwargs": "text", "images_kwargs": "images", "common_kwargs": None}

_PAIRS = "the processor takes single prompts, not text pairs"
_NO_AUDIO = "this processor has no audio input"
_CROP = "the tiled image processor never crops: it resizes to the longest edge and cuts whole tiles"


_pos, _opt_bool = oc.optional(oc.as_positive_int), oc.optional(oc.as_bool)

_ROWS = [
    # text
    Keyword("add_special_tokens", "text", oc.as_bool),
    Keyword("padding", "text", oc.as_padding),
    Keyword("truncation", "text", oc.optional(oc.as_truncation)),
    Keyword("max_length", "text", _pos),
    Keyword("pad_to_multiple_of", "text", _pos),
    Keyword("padding_side", "text", oc.optional(oc.as_padding_side)),
    Keyword("return_attention_mask", "text", _opt_bool),
    Keyword("return_token_type_ids", "text", _opt_bool),
    Keyword("return_length", "text", _opt_bool),
    Keyword("verbose", "text", _opt_bool),  # only decides whether transformers logs; no effect on the output
    Keyword("stride", "text", refused="stride only applies to return_overflowing_tokens", no_op=(None, 0)),
    Keyword("return_overflowing_tokens", "text", refused="overflowing windows would cut image tokens apart",
            no_op=(None, False)),  # fmt: skip
    Keyword("return_special_tokens_mask", "text", _opt_bool),
    Keyword("return_offsets_mapping", "text", _opt_bool),  # offsets into the expanded prompt, as transformers
    Keyword("return_mm_token_type_ids", "text", _opt_bool),
    Keyword("return_text_replacement_offsets", "text", refused="not implemented; the image spans are "
            "given by processor.prompt_cost()", no_op=(None, False)),  # fmt: skip
    Keyword("sanitize_control_tokens", "text", refused="not implemented: control tokens in user text are "
            "tokenized as control tokens", no_op=(None, False)),  # fmt: skip
    Keyword("is_split_into_words", "text", refused="pre-tokenized input is not taken; pass strings",
            no_op=(None, False)),  # fmt: skip
    Keyword("text_pair", "text", refused=_PAIRS),
    Keyword("text_target", "text", refused=_PAIRS),
    Keyword("text_pair_target", "text", refused=_PAIRS),
    # images
    Keyword("do_image_splitting", "images", _opt_bool),
    Keyword("longest_edge", "images", _pos),  # vlmkit's own spelling of size={'longest_edge': N}
    Keyword("size", "images", oc.optional(oc.as_longest_edge)),
    Keyword("max_image_size", "images", oc.optional(oc.as_longest_edge)),
    Keyword("max_visual_tokens", "images", _pos),
    Keyword("do_convert_rgb", "images", _opt_bool),
    Keyword("do_resize", "images", _opt_bool),
    Keyword("resample", "images", oc.optional(oc.as_resample)),
    Keyword("do_rescale", "images", _opt_bool),
    Keyword("rescale_factor", "images", oc.optional(oc.as_factor)),
    Keyword("do_normalize", "images", _opt_bool),
    Keyword("image_mean", "images", oc.optional(oc.as_triple)),
    Keyword("image_std", "images", oc.optional(oc.as_triple)),
    Keyword("return_row_col_info", "images", _opt_bool),
    Keyword("image_seq_len", "images", _pos),
    Keyword("image_seq_length", "images", _pos),
    Keyword("disable_grouping", "images", _opt_bool),  # transformers' torch-backend batching; no effect on values
    Keyword("device", "images", oc.optional(oc.as_device)),  # the output tensors are moved there
    Keyword("do_pad", "images", refused="the processor always pads a batch into one (B, N, 3, H, W) tensor "
            "with pixel_attention_mask", no_op=(None, True)),  # fmt: skip
    Keyword("pad_size", "images", refused=_CROP),
    Keyword("do_center_crop", "images", refused=_CROP, no_op=(None, False)),
    Keyword("crop_size", "images", refused=_CROP),
    Keyword("default_to_square", "images", refused=_CROP, no_op=(None, False)),
    Keyword("data_format", "images", refused="pixel_values are always channels first (B, N, 3, H, W)",
            no_op=(None, "channels_first")),  # fmt: skip
    Keyword("input_data_format", "images", refused="the channel axis is read from the input: last for numpy "
            "arrays and PIL images, first for torch tensors; convert the array to that layout"),  # fmt: skip
    # common
    Keyword("return_tensors", "common", oc.as_return_tensors),
    Keyword("audio", "common", refused=_NO_AUDIO),
    Keyword("audio_kwargs", "common", refused=_NO_AUDIO, no_op=(None, {})),
]

#: Every keyword ``Processor.__call__`` takes besides ``text`` and ``images``.
CALL_KEYWORDS: dict[str, Keyword] = {row.name: row for row in _ROWS}


def add_keywords(*keywords: Keyword, nesting: Mapping[str, str | None] | None = None) -> None:
    """Add keywords (and nesting names such as ``videos_kwargs``) to the table; names must be new."""
    for kw in keywords:
        if kw.name in CALL_KEYWORDS or kw.name in GROUPS:
            raise ValueError(f"processor keyword {kw.name!r} is already in the table")
        CALL_KEYWORDS[kw.name] = kw
    GROUPS.update(nesting or {})


def _unknown(name: str, where: str) -> ProcessorError:
    names = sorted([*CALL_KEYWORDS, *GROUPS])
    near = closest(name, names)
    return ProcessorError(
        f"unknown processor keyword {name!r}{where}" + (f"; did you mean {near!r}?" if near else ""),
        hint="valid keywords: " + ", ".join(names),
    )


def _flatten(kwargs: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    """``{name: (value, where it came from)}``; nested keywords must belong to their group."""
    flat: dict[str, tuple[Any, str]] = {k: (v, "") for k, v in kwargs.items() if k not in GROUPS}
    for outer, value in kwargs.items():
        if outer not in GROUPS or value is None:
            continue
        if not isinstance(value, Mapping):
            raise ProcessorError(f"{outer} must be a dict of keywords, got {short_repr(value)}")
        for name, inner in value.items():
            where = f" (in {outer})"
            kw = CALL_KEYWORDS.get(name)
            if kw is None:
                raise _unknown(name, where)
            if GROUPS[outer] is not None and kw.group not in (GROUPS[outer], "common"):
                raise ProcessorError(
                    f"{name} is a {kw.group} keyword but was passed in {outer}",
                    hint=f"pass it flat or in {kw.group}_kwargs" if kw.group != "common" else "pass it flat",
                )
            if name in flat and flat[name][0] != inner:
                raise ProcessorError(
                    f"{name} was passed twice with different values: {short_repr(flat[name][0])}"
                    f"{flat[name][1] or ' (flat)'} and {short_repr(inner)}{where}",
                    hint="pass it once",
                )
            flat[name] = (inner, where)
    return flat


def resolve_call_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The checked, normalized keywords of one processor call (refused no-op values dropped).

    Flat keywords win over nested ones only when equal; a keyword given twice with different
    values is an error, as in transformers.
    """
    out: dict[str, Any] = {}
    for name, (value, where) in _flatten(kwargs).items():
        kw = CALL_KEYWORDS.get(name)
        if kw is None:
            raise _unknown(name, where)
        resolved = kw.resolve(value)
        if resolved is not _NOT_GIVEN:
            out[name] = resolved
    return out
