"""Normalizing what users pass to the processor: prompts, nested image lists, options, messages."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ProcessorError

__all__ = ["as_nested_images", "as_texts", "check_limit", "check_placeholder_counts", "normalize_messages"]

IMAGE_TYPES = (Image.Image, np.ndarray, torch.Tensor)


def check_limit(limit: Any) -> int | None:
    if limit is None:
        return None
    if not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit <= 0:
        raise ProcessorError(f"max_visual_tokens must be a positive integer or None, got {limit!r}")
    return int(limit)


def check_placeholder_counts(texts: list[str], nested: list[list[Any]], token: str) -> None:
    """A :class:`ProcessorError` unless each prompt of ``texts`` has one ``token`` per image of its row of ``nested``."""
    if len(nested) != len(texts):
        raise ProcessorError(
            f"{len(texts)} prompt(s) but {len(nested)} list(s) of images",
            hint="pass one list of images per prompt (an empty list for a prompt without images)",
        )
    for i, (prompt, imgs) in enumerate(zip(texts, nested)):
        n = prompt.count(token)
        if n != len(imgs):
            raise ProcessorError(
                f"sample {i}: the prompt has {n} {token} placeholder(s) but {len(imgs)} image(s) "
                "were given for it",
                hint=f"write one {token} in the text per image, in order "
                "(apply_chat_template inserts them for {'type': 'image'} items)",
            )


def as_texts(text: Any) -> list[str] | None:
    if text is None:
        return None
    texts = [text] if isinstance(text, str) else list(text)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad or not texts:
        raise ProcessorError(
            f"text must be a string or a non-empty list of strings; got {type(text).__name__}"
            + (f" with a {type(texts[bad[0]]).__name__} at index {bad[0]}" if bad else " (empty)")
        )
    return texts


def as_nested_images(images: Any, texts: list[str] | None, token: str) -> list[list[Any]]:
    """One list of images per prompt; a flat list is shared out by each prompt's placeholder count."""
    n_prompts = 1 if texts is None else len(texts)
    if images is None:
        return [[] for _ in range(n_prompts)]
    if isinstance(images, IMAGE_TYPES):
        return [[images]]
    if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Iterable):
        raise ProcessorError(
            f"images is a {type(images).__name__}; expected a PIL image, a list of them, or one list per prompt",
            hint="open files with PIL.Image.open(path)",
        )
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):
        return [list(x) for x in images]
    if texts is None:
        return [images]
    counts = [t.count(token) for t in texts]
    if sum(counts) != len(images):
        per = ", ".join(f"sample {i}: {n}" for i, n in enumerate(counts))
        raise ProcessorError(
            f"{len(images)} image(s) were given but the prompts hold {sum(counts)} {token} placeholder(s) ({per})",
            hint=f"write one {token} per image, or pass one list of images per prompt",
        )
    out, start = [], 0
    for n in counts:
        out.append(images[start : start + n])
        start += n
    return out


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ProcessorError(f"message {k} is {message!r}; expected a dict with 'role' and 'content'")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({**message, "content": content})
    return out
