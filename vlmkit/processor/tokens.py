"""Token side of a processor call: truncation, padding and the text fields of the output.

Truncation follows transformers' fast tokenizers: the text is tokenized without special tokens,
cut to ``max_length`` minus the special tokens the post-processor adds, on the tokenizer's
``truncation_side`` (tokenizer_config.json), then the special tokens are added. A cut that
would remove an image's tokens is refused (transformers' ``special_mm_token_truncation`` check).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ProcessorError

__all__ = ["TokenOptions", "check_image_tokens", "encode_texts", "mm_token_type_ids", "pad_texts"]

#: tokenizer_config.json's "no limit" model_max_length (transformers' VERY_LARGE_INTEGER is 1e30).
_NO_LIMIT = 10**18


@dataclass(frozen=True)
class TokenOptions:
    """The resolved text keywords of one call (see :mod:`vlmkit.processor.options`)."""

    padding: str = "longest"  # 'longest' | 'max_length' | 'none'
    truncation: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"
    add_special_tokens: bool = True
    return_attention_mask: bool = True
    return_token_type_ids: bool = False
    return_length: bool = False
    return_mm_token_type_ids: bool = False
    return_special_tokens_mask: bool = False
    return_offsets_mapping: bool = False


def _limit(tokenizer: Any, opts: TokenOptions) -> int:
    if opts.max_length is not None:
        return opts.max_length
    value = tokenizer.config.get("model_max_length")
    if isinstance(value, (int, float)) and 0 < value < _NO_LIMIT:
        return int(value)
    raise ProcessorError(
        "truncation / padding='max_length' need a length, and tokenizer_config.json sets no model_max_length",
        hint="pass max_length=N",
    )


def encode_texts(tokenizer: Any, texts: Sequence[str], opts: TokenOptions) -> list[Any]:
    """``tokenizers.Encoding`` of each text (``.ids``, ``.special_tokens_mask``), truncated to
    ``max_length`` when ``opts.truncation``."""
    if not opts.truncation:
        return tokenizer.backend.encode_batch(list(texts), add_special_tokens=opts.add_special_tokens)
    limit = _limit(tokenizer, opts)
    backend = tokenizer.backend
    added = backend.num_special_tokens_to_add(False) if opts.add_special_tokens else 0
    if limit < added:
        raise ProcessorError(f"max_length={limit} is shorter than the {added} special tokens every prompt gets")
    side = tokenizer.config.get("truncation_side", "right")
    if side not in ("left", "right"):
        raise ProcessorError(f"tokenizer_config.json truncation_side={side!r}; expected 'left' or 'right'")
    out = []
    for enc in backend.encode_batch(list(texts), add_special_tokens=False):
        if len(enc.ids) + added > limit:
            enc.truncate(limit - added, direction=side)
        out.append(backend.post_process(enc, None, opts.add_special_tokens))
    return out


def _find_spans(seq: list[int], spans: list[list[int]]) -> list[int] | None:
    """Start of each span in ``seq``, found in order; ``None`` when one is not there whole."""
    starts, at = [], 0
    for span in spans:
        start = next((i for i in range(at, len(seq) - len(span) + 1) if seq[i : i + len(span)] == span), None)
        if start is None:
            return None
        starts.append(start)
        at = start + len(span)
    return starts


def check_image_tokens(
    ids: list[list[int]], spans: list[list[list[int]]], image_token_id: int, opts: TokenOptions
) -> None:
    """Refuse a truncation that cut into an image's tokens (its placeholders or its framing tokens):
    the model needs each image's expansion (``spans[b][k]``, ids) whole."""
    for i, (seq, images) in enumerate(zip(ids, spans)):
        if _find_spans(seq, images) is None:
            want = sum(t == image_token_id for span in images for t in span)
            got = sum(t == image_token_id for t in seq)
            raise ProcessorError(
                f"sample {i}: truncating to max_length={opts.max_length} would cut its image tokens "
                f"({got} of {want} left); the model needs all of them",
                hint="raise max_length, pass truncation=False, or use fewer / cheaper images "
                "(do_image_splitting=False, a smaller longest_edge)",
            )


def _target(lengths: list[int], tokenizer: Any, opts: TokenOptions) -> int | None:
    if opts.padding == "none":
        return None
    target = _limit(tokenizer, opts) if opts.padding == "max_length" else max(lengths)
    if opts.pad_to_multiple_of:
        target = -(-target // opts.pad_to_multiple_of) * opts.pad_to_multiple_of
    return target


def mm_token_type_ids(ids: list[list[int]], spans: list[list[list[int]]]) -> list[list[int]]:
    """1 on every token of each image's expansion (``spans[b][k]`` is image ``k``'s ids), else 0.

    The expansions are found in order in each row of ``ids``, as transformers' processor marks them.
    """
    out = []
    for b, (seq, images) in enumerate(zip(ids, spans)):
        starts = _find_spans(seq, images)
        if starts is None:
            raise ProcessorError(f"internal: an image of sample {b} is not whole in input_ids")
        marks = [0] * len(seq)
        for start, span in zip(starts, images):
            marks[start : start + len(span)] = [1] * len(span)
        out.append(marks)
    return out


def _pad(rows: list[list[Any]], target: int, value: Any, left: bool) -> list[list[Any]]:
    return [[value] * (target - len(r)) + r if left else r + [value] * (target - len(r)) for r in rows]


def _as_tensors(fields: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
    """``(B, L)`` int64 tensors (``'pt'``) or arrays (``'np'``); lists for ``None``."""
    if return_tensors is None:
        return fields
    lengths = [len(s) for s in fields["input_ids"]]
    if len(set(lengths)) > 1:
        raise ProcessorError(
            f"the prompts have lengths {lengths} after padding, which cannot form one tensor",
            hint="pass padding=True (or truncation=True with padding='max_length'), or return_tensors=None for lists",
        )
    if return_tensors == "pt":
        return {k: torch.tensor(v, dtype=torch.long) for k, v in fields.items()}
    return {k: np.array(v, dtype=np.int64) for k, v in fields.items()}


def pad_texts(
    ids: list[list[int]],
    tokenizer: Any,
    pad_id: int | None,
    opts: TokenOptions,
    return_tensors: str | None,
    image_spans: list[list[list[int]]] | None = None,
    special_masks: list[list[int]] | None = None,
    offsets: list[list[tuple[int, int]]] | None = None,
) -> dict[str, Any]:
    """Pad to the target length on ``opts.padding_side``; ``(B, L)`` tensors/arrays or lists.

    ``image_spans`` (each image's expanded ids, per sample) give ``mm_token_type_ids`` and
    ``special_masks`` (1 on tokens the post-processor added) ``special_tokens_mask`` and ``offsets``
    (character spans in the expanded prompt) ``offset_mapping`` ``(B, L, 2)``, when asked for.
    """
    target = _target([len(s) for s in ids], tokenizer, opts)
    masks = [[1] * len(seq) for seq in ids]
    special = [list(m) for m in special_masks] if special_masks is not None else [[0] * len(s) for s in ids]
    spans = [list(o) for o in offsets] if offsets is not None else [[(0, 0)] * len(s) for s in ids]
    if target is not None and any(len(seq) < target for seq in ids):
        if pad_id is None:
            raise ProcessorError(
                "padding needs a pad token and the checkpoint names none",
                hint="pass padding=False and process the prompts one at a time",
            )
        left = opts.padding_side == "left"
        ids, masks = _pad(ids, target, pad_id, left), _pad(masks, target, 0, left)
        special = _pad(special, target, 1, left)  # padding counts as special, as in transformers
        spans = _pad(spans, target, (0, 0), left)
    fields: dict[str, Any] = {"input_ids": ids}
    if opts.return_token_type_ids:
        fields["token_type_ids"] = [[0] * len(seq) for seq in ids]
    if opts.return_attention_mask:
        fields["attention_mask"] = masks
    if opts.return_special_tokens_mask:
        fields["special_tokens_mask"] = special
    if opts.return_offsets_mapping:
        fields["offset_mapping"] = spans
    if opts.return_mm_token_type_ids:
        fields["mm_token_type_ids"] = mm_token_type_ids(ids, image_spans or [[] for _ in ids])
    if opts.return_length:
        fields["length"] = [len(seq) for seq in ids]
    return _as_tensors(fields, return_tensors)
