"""Helpers of the server tests: images as data URLs, OpenAI message parts, the greedy reference."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from vlmkit.generation import default_stop_ids

__all__ = ["png", "data_url", "image_part", "user", "as_processor_message", "decoded", "reference"]


def png(size=(96, 64), mode="RGB", fmt="PNG", noise=False) -> bytes:
    if noise:
        image = Image.frombytes("RGB", size, torch.randint(0, 256, (size[0] * size[1] * 3,), dtype=torch.uint8).numpy().tobytes())
    else:
        image = Image.radial_gradient("L").convert(mode).resize(size)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def image_part(url: str, detail: str | None = None) -> dict:
    inner = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": inner}


def reference(model, proc, messages: list[dict], images: list, max_new: int, **kwargs) -> tuple[str, str, int]:
    """``(text, finish_reason, prompt tokens)`` of ``model.generate`` alone, greedy."""
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    batch = proc(text=text, images=images or None, **kwargs)
    out = model.generate(batch["input_ids"], pixel_values=batch.get("pixel_values"),
                         pixel_attention_mask=batch.get("pixel_attention_mask"), max_new_tokens=max_new)  # fmt: skip
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    stops = set(default_stop_ids(model))
    cut = next((i for i, t in enumerate(new) if t in stops), None)
    reason = "length" if cut is None else "stop"
    return proc.decode(new[:cut], skip_special_tokens=True), reason, batch["input_ids"].shape[1]


def user(text: str, *parts: dict) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def as_processor_message(text: str, n_images: int) -> dict:
    return {"role": "user", "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": text}]}


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))
