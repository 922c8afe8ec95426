"""A checked chat request -> model inputs, with the token-cost preflight.

:meth:`Preparer.prepare` turns OpenAI messages into the processor's chat format (an ``image``
item per ``image_url`` part, in order), renders the checkpoint's chat template, loads and checks
the images (:mod:`vlmkit.serve.images`), then asks :meth:`vlmkit.processor.Processor.prompt_cost`
what the prompt costs -- before any pixel is resized -- so a request whose prompt plus
``max_tokens`` does not fit the context is a 400 that says how many tokens the text and each
image cost. Only then does the processor build ``input_ids`` and the image tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import VlmkitError
from .errors import RequestError, bad_request
from .images import ImageLimits, load_image
from .protocol import ChatCompletionRequest, ImagePart, Message

__all__ = ["Preparer", "Prepared"]

_SPLIT = {"low": False, "high": True}


@dataclass(frozen=True)
class Prepared:
    """Model inputs of one request: ``input_ids`` ``(1, T)``, the image tensors, ``max_tokens``."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    pixel_attention_mask: torch.Tensor | None
    max_tokens: int


class Preparer:
    """Prepares requests for one processor and context length; ``max_images`` per request."""

    def __init__(self, processor: Any, *, context: int, max_images: int, limits: ImageLimits) -> None:
        self.processor, self.context, self.max_images, self.limits = processor, context, max_images, limits

    def prepare(self, request: ChatCompletionRequest) -> Prepared:
        """See the module docstring; every refusal is a 400 :class:`RequestError`."""
        limit = request.token_limit()
        messages, parts = _to_chat(request.messages)
        if len(parts) > self.max_images:
            raise bad_request(f"the request has {len(parts)} images; this server takes at most {self.max_images}",
                              "messages", hint="send fewer images (--max-images sets the limit)")  # fmt: skip
        split = _splitting(parts, self.processor.image_splitting is not None)
        images = [load_image(part.image_url.url, where, self.limits) for where, part in parts]
        kwargs = {} if split is None else {"do_image_splitting": split}
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            cost = self.processor.prompt_cost(text, images or None, **kwargs)
            max_tokens = self._budget(cost, limit)
            batch = self.processor(text=text, images=images or None, **kwargs)
        except VlmkitError as exc:
            if isinstance(exc, RequestError):
                raise
            raise bad_request(exc.message, "messages", hint=exc.hint) from None
        return Prepared(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"), max_tokens)

    def _budget(self, cost: Any, limit: int | None) -> int:
        """``max_tokens`` (default: the rest of the context), or a 400 that itemises the prompt."""
        room = self.context - cost.total_tokens
        param = "max_tokens" if limit is not None else "messages"
        if room >= 1 and (limit is None or limit <= room):
            return room if limit is None else limit
        asked = f"; with max_tokens {limit} that is {cost.total_tokens + limit} tokens," if limit is not None else ","
        fix = f"lower max_tokens to at most {room}" if room >= 1 else "shorten the messages"
        raise bad_request(
            f"the prompt is {_describe(cost)}{asked} more than the model's context of {self.context} tokens",
            param, hint=f"{fix}, or send fewer or smaller images (detail='low' sends an image as one tile)",
            code="context_length_exceeded",
        )  # fmt: skip


def _to_chat(messages: list[Message]) -> tuple[list[dict[str, Any]], list[tuple[str, ImagePart]]]:
    """OpenAI messages -> the processor's chat format, and each image part with where it was."""
    chat, parts = [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if isinstance(content, str):
            chat.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not content:
            raise bad_request(f"messages[{i}].content is an empty list", f"messages[{i}].content",
                              hint="send a string or at least one content part")  # fmt: skip
        items = []
        for j, part in enumerate(content):
            if isinstance(part, ImagePart):
                where = f"messages[{i}].content[{j}]"
                if role != "user":
                    raise bad_request(f"{where}: images are only allowed in user messages, not {message.role}", where)
                parts.append((where, part))
                items.append({"type": "image"})
            else:
                items.append({"type": "text", "text": part.text})
        chat.append({"role": role, "content": items})
    return chat, parts


def _splitting(parts: list[tuple[str, ImagePart]], splits: bool) -> bool | None:
    """``detail`` of the images: ``low`` -> no splitting, ``high`` -> splitting, ``auto`` -> the
    checkpoint's default. The processor splits all images of a prompt alike, so low and high
    cannot be mixed. A processor that never splits (``splits`` false) takes ``low`` (what it
    does anyway: ``None``) and refuses ``high``."""
    details = {part.image_url.detail for _, part in parts} - {"auto"}
    if len(details) > 1:
        raise bad_request("the images mix detail='low' and detail='high'; one request takes one of them",
                          "messages", hint="give every image the same detail (or 'auto')")  # fmt: skip
    if not splits and "high" in details:
        raise bad_request("detail='high' is not supported: this model's image processor gives every image one "
                          "input at one resolution", "messages", hint="send detail='auto' or 'low'")  # fmt: skip
    return _SPLIT[details.pop()] if details and splits else None


def _describe(cost: Any) -> str:
    """``"1130 tokens (42 text + 1088 visual; image 1: 1088 = 4x4 tiles + global = 17 tiles)"``."""
    if not cost.images:
        return f"{cost.total_tokens} tokens (text only)"
    each = []
    for k, image in enumerate(cost.images, start=1):
        rows, cols = image.tiles
        tiles = f"{rows}x{cols} tiles + global = {image.n_tiles} tiles" if rows else "1 tile"
        each.append(f"image {k}: {image.visual_tokens} = {tiles}")
    return f"{cost.total_tokens} tokens ({cost.text_tokens} text + {cost.visual_tokens} visual; {'; '.join(each)})"
