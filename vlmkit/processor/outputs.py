"""What the processor returns: the model inputs (:class:`ProcessorOutput`) and a prompt's token
count (:class:`PromptCost`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .image import ImageCost

__all__ = ["ProcessorOutput", "PromptCost"]


class ProcessorOutput(dict):
    """A dict of model inputs that also allows attribute access (``out.input_ids``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ProcessorOutput:
        """Move tensors to ``device``; cast floating tensors (pixel_values) to ``dtype``."""
        out = ProcessorOutput()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                value = value.to(
                    device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None
                )
            out[key] = value
        return out


@dataclass(frozen=True)
class PromptCost:
    """Token count of one prompt with its images: ``total_tokens = text_tokens + visual_tokens``.

    ``text_tokens`` includes the framing tokens around the images (and a video's timestamps);
    ``images`` holds each image's :class:`ImageCost` in prompt order, ``videos`` each video's
    :class:`~vlmkit.processor.video.VideoPlan` (its frames cost ``image_seq_len`` tokens each).
    """

    total_tokens: int
    text_tokens: int
    visual_tokens: int
    images: tuple[ImageCost, ...]
    videos: tuple[Any, ...] = ()
