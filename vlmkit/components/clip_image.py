"""CLIP image preprocessing, as transformers' ``CLIPImageProcessorPil`` (the slow, PIL one).

One image -> ``(3, H, W)`` float32, in the reference's order and arithmetic:

1. convert to RGB (transparency composited onto white) -- :func:`vlmkit.processor.image.to_rgb`;
2. resize with Pillow in uint8 (``resample``, bicubic by default): ``size.shortest_edge`` makes
   the short side that long and the long side ``int(shortest_edge * long / short)``;
   ``size.height``/``size.width`` resizes to exactly that;
3. center crop to ``crop_size`` (an image smaller than the crop is zero-padded first, centred
   as the reference does);
4. rescale (``value * rescale_factor`` in float64, then float32) and normalize
   (``(value - mean) / std`` in float32).

:class:`ClipImageSettings` reads a ``preprocessor_config.json`` dict and checks every key;
anything wrong is a :class:`~vlmkit.errors.SpecError` naming the key. The pixels equal the
reference's bit for bit. (transformers 5's default ``CLIPImageProcessor`` is the torchvision
backend, whose bicubic resize differs from Pillow's by a few uint8 levels on some pixels.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import SpecError
from ..processor.image import to_rgb

__all__ = [
    "ClipImageSettings",
    "preprocess",
    "resized_size",
    "center_crop",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "METADATA_KEYS",
]

#: transformers' defaults for CLIP image processors (``image_utils.OPENAI_CLIP_MEAN`` / ``_STD``).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Keys that name the processor and change no pixel.
METADATA_KEYS = frozenset({"image_processor_type", "feature_extractor_type", "processor_class"})

_BOOL_KEYS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")
_KNOWN_KEYS = frozenset(
    {*_BOOL_KEYS, "size", "crop_size", "resample", "rescale_factor", "image_mean", "image_std"}
)


@dataclass(frozen=True)
class ClipImageSettings:
    """The settings of a CLIP image processor, with transformers' defaults.

    Exactly one of ``shortest_edge`` (``size.shortest_edge``) and ``resize_to``
    (``(size.height, size.width)``) is set. ``crop_size`` is ``(height, width)``.
    """

    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None
    crop_size: tuple[int, int] = (224, 224)
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of every output, or ``None`` when it depends on the image (no crop)."""
        if self.do_center_crop:
            return self.crop_size
        return self.resize_to if self.do_resize else None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], source: str = "preprocessor_config.json") -> ClipImageSettings:
        """Read and check a ``preprocessor_config.json`` dict; ``SpecError`` names the bad key."""
        if not isinstance(cfg, Mapping):
            raise SpecError(f"expected a JSON object, got {type(cfg).__name__}", source=source)
        unknown = sorted(set(cfg) - _KNOWN_KEYS - METADATA_KEYS)
        if unknown:
            raise SpecError(
                f"unknown CLIP image processor key(s) {unknown}; known keys: {', '.join(sorted(_KNOWN_KEYS))}",
                key_path=unknown[0],
                source=source,
                hint="remove the key, or use the image processor that understands it",
            )
        flags = {key: _flag(cfg, key, source) for key in _BOOL_KEYS}
        shortest, resize_to = _size(cfg.get("size", {"shortest_edge": 224}), source)
        return cls(
            shortest_edge=shortest,
            resize_to=resize_to,
            crop_size=_crop(cfg.get("crop_size", {"height": 224, "width": 224}), source),
            resample=_resample(cfg.get("resample", int(Image.Resampling.BICUBIC)), source),
            rescale_factor=_positive(cfg.get("rescale_factor", 1 / 255), "rescale_factor", source),
            image_mean=_triple(cfg.get("image_mean", OPENAI_CLIP_MEAN), "image_mean", source),
            image_std=_triple(cfg.get("image_std", OPENAI_CLIP_STD), "image_std", source, positive=True),
            **flags,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(cfg: Mapping[str, Any], key: str, source: str) -> bool:
    value = cfg.get(key, True)
    if not isinstance(value, bool):
        raise SpecError(f"expected true or false, got {value!r}", key_path=key, source=source)
    return value


def _side(value: Any, key_path: str, source: str) -> int:
    if not _is_int(value) or value <= 0:
        raise SpecError(f"expected a positive number of pixels, got {value!r}", key_path=key_path, source=source)
    return value


def _size(value: Any, source: str) -> tuple[int | None, tuple[int, int] | None]:
    """``size``: an int or ``{"shortest_edge": n}`` -> shortest edge; ``{"height", "width"}`` -> exact size."""
    if _is_int(value):
        return _side(value, "size", source), None
    if isinstance(value, Mapping) and set(value) == {"shortest_edge"}:
        return _side(value["shortest_edge"], "size.shortest_edge", source), None
    if isinstance(value, Mapping) and set(value) == {"height", "width"}:
        return None, (_side(value["height"], "size.height", source), _side(value["width"], "size.width", source))
    raise SpecError(
        f"expected {{'shortest_edge': n}}, {{'height': h, 'width': w}} or an int, got {value!r}",
        key_path="size",
        source=source,
        hint="CLIP image processors resize the shortest edge (LLaVA: {'shortest_edge': 336})",
    )


def _crop(value: Any, source: str) -> tuple[int, int]:
    """``crop_size``: an int (square) or ``{"height": h, "width": w}``."""
    if _is_int(value):
        side = _side(value, "crop_size", source)
        return side, side
    if isinstance(value, Mapping) and set(value) == {"height", "width"}:
        return _side(value["height"], "crop_size.height", source), _side(value["width"], "crop_size.width", source)
    raise SpecError(
        f"expected {{'height': h, 'width': w}} or an int, got {value!r}", key_path="crop_size", source=source
    )


def _resample(value: Any, source: str) -> int:
    valid = sorted(int(r) for r in Image.Resampling)
    if not _is_int(value) or value not in valid:
        names = ", ".join(f"{int(r)}={r.name}" for r in Image.Resampling)
        raise SpecError(
            f"resample={value!r} is not a Pillow resampling filter ({names})", key_path="resample", source=source
        )
    return value


def _positive(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SpecError(f"expected a positive number, got {value!r}", key_path=key, source=source)
    return float(value)


def _triple(value: Any, key: str, source: str, *, positive: bool = False) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise SpecError(f"expected 3 numbers (one per RGB channel), got {value!r}", key_path=key, source=source)
    if positive and any(v <= 0 for v in value):
        raise SpecError(f"expected 3 positive numbers, got {list(value)}", key_path=key, source=source)
    return (float(value[0]), float(value[1]), float(value[2]))


def resized_size(height: int, width: int, settings: ClipImageSettings) -> tuple[int, int]:
    """``(height, width)`` after the resize step, with the reference's rounding."""
    if not settings.do_resize:
        return height, width
    if settings.resize_to is not None:
        return settings.resize_to
    side = settings.shortest_edge
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(side * long / short)
    return (new_long, side) if width <= height else (side, new_long)


def center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> ``(h, w, 3)``: the centre ``size`` window; an image smaller than the
    window is first zero-padded (the extra row/column of an odd pad goes to the top/left)."""
    height, width = pixels.shape[:2]
    crop_h, crop_w = size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    pad_top, pad_left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    canvas = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    canvas[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def preprocess(image: Image.Image, settings: ClipImageSettings, *, where: str = "image") -> torch.Tensor:
    """One image (PIL, or uint8 ``(H, W[, C])`` array / ``(C, H, W)`` tensor) -> float32 ``(3, H', W')``.

    ``(H', W') = settings.crop_size`` with center crop on. ``where`` names the image in errors
    (:class:`~vlmkit.errors.ProcessorError` for an unusable mode or dtype).
    """
    image = to_rgb(image, where, convert=settings.do_convert_rgb)
    if settings.do_resize:
        height, width = resized_size(image.height, image.width, settings)
        image = image.resize((width, height), resample=Image.Resampling(settings.resample))
    pixels = np.asarray(image)
    if settings.do_center_crop:
        pixels = center_crop(pixels, settings.crop_size)
    values = pixels.astype(np.float32)
    if settings.do_rescale:
        values = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    if settings.do_normalize:
        mean = np.asarray(settings.image_mean, dtype=np.float32)
        std = np.asarray(settings.image_std, dtype=np.float32)
        values = (values - mean) / std
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))
