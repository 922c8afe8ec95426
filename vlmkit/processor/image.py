"""Image side of the processor: RGB conversion, resize, tiling, rescale/normalize, batch padding.

The tiled layout (the reference image processor of the built-in tiled family): the image is resized so its longest
edge is ``longest_edge`` (upscaling small images too), then, with splitting on, resized again
so both sides are multiples of the tile size, cut into ``rows x cols`` tiles, and followed by
one "global" tile (the whole image squeezed to ``tile x tile``). With splitting off, the image
is squeezed straight to one ``tile x tile`` tile. Resizing is done by Pillow in uint8, exactly
as the reference does, so pixels match it bit for bit.

All sizes in this module are ``(height, width)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ProcessorError, SpecError

__all__ = [
    "MAX_IMAGE_EDGE",
    "SUPPORTED_MODES",
    "ImageCost",
    "ImageSettings",
    "check_format",
    "encode_image",
    "image_size",
    "pad_batch",
    "plan_image",
    "to_rgb",
]

#: Hard cap on the longest edge after the first resize (as the reference processor).
MAX_IMAGE_EDGE = 4096

#: PIL modes converted to RGB. High bit-depth modes (I, I;16, F) are refused: Pillow would clip
#: them to 8 bits silently.
SUPPORTED_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


@dataclass(frozen=True)
class ImageCost:
    """What one image costs the language model, computed from its size alone.

    ``tiles`` is the ``(rows, cols)`` grid, ``(0, 0)`` when the image is not split;
    ``n_tiles`` counts the global tile too; ``visual_tokens = n_tiles * image_seq_len`` image
    tokens; ``resized_size`` is the ``(height, width)`` the image is resized to before it is cut
    (``(tile, tile)`` when it is a single tile); ``input_size`` is the original
    ``(height, width)`` and ``scaled_size`` the size after the longest-edge resize.
    """

    tiles: tuple[int, int]
    n_tiles: int
    visual_tokens: int
    resized_size: tuple[int, int]
    input_size: tuple[int, int]
    scaled_size: tuple[int, int]

    @property
    def patches(self) -> tuple[int, int, int]:
        """``(num_patches, num_rows, num_cols)`` in transformers' ``get_number_of_image_patches`` terms:
        ``(0, 0, 0)`` for an image that stays one tile, else ``(rows * cols + 1, rows, cols)``."""
        rows, cols = self.tiles
        return (self.n_tiles, rows, cols) if rows else (0, 0, 0)


@dataclass(frozen=True)
class ImageSettings:
    """Image settings read from ``preprocessor_config.json``.

    ``longest_edge`` is ``size.longest_edge`` and ``tile`` is ``max_image_size.longest_edge``.
    """

    longest_edge: int
    tile: int
    do_image_splitting: bool = True
    do_resize: bool = True
    do_convert_rgb: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = int(Image.Resampling.LANCZOS)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], source: str) -> ImageSettings:
        """Read and check a ``preprocessor_config.json`` dict; ``SpecError`` names the bad key."""
        longest = _edge(cfg, "size", source)
        tile = _edge(cfg, "max_image_size", source)
        mean = _triple(cfg, "image_mean", source, 0.5)
        std = _triple(cfg, "image_std", source, 0.5)
        if any(s <= 0 for s in std):
            raise SpecError(f"image_std must be positive, got {list(std)}", key_path="image_std", source=source)
        rescale = cfg.get("rescale_factor", 1 / 255)
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not math.isfinite(rescale) or rescale <= 0:
            raise SpecError(f"rescale_factor must be a positive number, got {rescale!r}", key_path="rescale_factor",
                            source=source, hint="8-bit images use 1/255 = 0.00392156862745098")  # fmt: skip
        resample = cfg.get("resample", int(Image.Resampling.LANCZOS))
        if resample not in {int(r) for r in Image.Resampling}:
            raise SpecError(
                f"resample={resample!r} is not a Pillow resampling filter (0-5)", key_path="resample", source=source
            )
        return cls(
            longest_edge=longest,
            tile=tile,
            do_image_splitting=bool(cfg.get("do_image_splitting", True)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(rescale),
            do_normalize=bool(cfg.get("do_normalize", True)),
            mean=mean,
            std=std,
            resample=int(resample),
        )


def _edge(cfg: Mapping[str, Any], key: str, source: str) -> int:
    value = cfg.get(key)
    edge = value.get("longest_edge") if isinstance(value, Mapping) else None
    if not isinstance(edge, int) or isinstance(edge, bool) or edge <= 0:
        raise SpecError(
            f"expected {{'longest_edge': <positive int>}}, got {value!r}",
            key_path=f"{key}.longest_edge",
            source=source,
            hint="tiled image processors give sizes as a longest edge in pixels",
        )
    return edge


def _triple(cfg: Mapping[str, Any], key: str, source: str, default: float) -> tuple[float, float, float]:
    value = cfg.get(key, default)
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not (isinstance(value, Sequence) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise SpecError(f"expected 3 numbers (one per RGB channel), got {value!r}", key_path=key, source=source)
    if any(isinstance(v, bool) or not math.isfinite(v) for v in value):
        raise SpecError(f"expected 3 finite numbers (one per RGB channel), got {list(value)!r}", key_path=key, source=source,
                        hint="one finite number per channel, as in the published preprocessor_config.json")  # fmt: skip
    return (float(value[0]), float(value[1]), float(value[2]))


# ----------------------------------------------------------------------------- sizes and cost


def image_size(image: Any, where: str) -> tuple[int, int]:
    """``(height, width)`` of a PIL image, an ``(H, W[, C])`` array or a ``(C, H, W)`` tensor.

    Reads no pixels. Raises :class:`ProcessorError` for other types and for empty images.
    """
    if isinstance(image, Image.Image):
        height, width = image.height, image.width
    elif isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3):
        height, width = _array_hw(image)
    else:
        shape = getattr(image, "shape", None)
        raise ProcessorError(
            f"{where} is a {type(image).__name__}{f' of shape {tuple(shape)}' if shape is not None else ''}; "
            "expected a PIL image, an (H, W) / (H, W, C) uint8 array or a (C, H, W) uint8 tensor",
            hint="open files with PIL.Image.open(path)",
        )
    if height <= 0 or width <= 0:
        raise ProcessorError(
            f"{where} is empty (height {height}, width {width})", hint="pass an image at least 1x1 pixel"
        )
    from ..limits import limit, raise_hint

    if int(height) * int(width) > limit("image_pixels"):
        raise ProcessorError(
            f"{where} is {width}x{height} = {int(height) * int(width):,} pixels, over the bound of "
            f"{limit('image_pixels'):,.0f} pixels per image",
            hint="downscale the image first; " + raise_hint("image_pixels"),
        )
    return int(height), int(width)


def _array_hw(array: np.ndarray | torch.Tensor) -> tuple[int, int]:
    shape = tuple(array.shape)
    if len(shape) == 2:
        return shape[0], shape[1]
    if isinstance(array, torch.Tensor) and shape[0] in (1, 3, 4):
        return shape[1], shape[2]  # tensors are channels first, as torchvision's
    return shape[0], shape[1]


def _fit_longest(height: int, width: int, longest: int) -> tuple[int, int]:
    """Scale so the longest edge is ``longest`` (up or down), short edge rounded up to even."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # Then keep the longest edge under the absolute cap.
    aspect = width / height
    if width >= height and width > MAX_IMAGE_EDGE:
        width, height = MAX_IMAGE_EDGE, int(MAX_IMAGE_EDGE / aspect)
    elif height > width and height > MAX_IMAGE_EDGE:
        height, width = MAX_IMAGE_EDGE, int(MAX_IMAGE_EDGE * aspect)
    return max(height, 1), max(width, 1)


def _fit_grid(height: int, width: int, tile: int) -> tuple[int, int]:
    """Round the image up to a whole number of tiles on both sides, the long side first."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def plan_image(
    size: tuple[int, int], settings: ImageSettings, image_seq_len: int, *, split: bool, longest_edge: int
) -> ImageCost:
    """The resize/tiling plan and token cost of an image of ``size = (height, width)``.

    Pure arithmetic; :func:`encode_image` follows the same plan.
    """
    scaled = _fit_longest(size[0], size[1], longest_edge) if settings.do_resize else size
    tile = settings.tile
    single = ImageCost((0, 0), 1, image_seq_len, (tile, tile), size, scaled)
    if not split:
        return single
    height, width = _fit_grid(scaled[0], scaled[1], tile)
    if height <= tile and width <= tile:
        return single  # the grid rounds up to exactly one tile: no split, no row/col tokens
    rows, cols = height // tile, width // tile
    n_tiles = rows * cols + 1
    return ImageCost((rows, cols), n_tiles, n_tiles * image_seq_len, (height, width), size, scaled)


# ----------------------------------------------------------------------------- pixels


def check_format(image: Any, where: str) -> None:
    """Refuse unsupported PIL modes, non-uint8 arrays and odd channel counts; reads no pixels."""
    if isinstance(image, Image.Image):
        if image.mode not in SUPPORTED_MODES:
            raise ProcessorError(
                f"{where} has PIL mode {image.mode!r}, which cannot be turned into 8-bit RGB without losing data; "
                f"supported modes: {', '.join(SUPPORTED_MODES)}",
                hint="convert it to 8 bits yourself first (e.g. scale the values to 0-255 and use mode 'L' or 'RGB')",
            )
        return
    dtype = image.dtype
    if dtype not in (np.uint8, torch.uint8):
        raise ProcessorError(
            f"{where} is an array of dtype {dtype}; expected uint8 pixel values 0-255",
            hint="convert with (x * 255).round().clip(0, 255).astype('uint8') for 0-1 floats",
        )
    channels = _channels(image)
    if channels not in (None, 1, 3, 4):
        raise ProcessorError(
            f"{where} has shape {tuple(image.shape)}: {channels} channels; expected 1, 3 or 4 "
            "(channels last for numpy arrays, first for torch tensors)",
            hint="pass an (H, W, 3) array or a PIL image",
        )


def _channels(array: np.ndarray | torch.Tensor) -> int | None:
    if array.ndim == 2:
        return None
    if isinstance(array, torch.Tensor) and array.shape[0] in (1, 3, 4):
        return int(array.shape[0])
    return int(array.shape[2])


def to_rgb(image: Any, where: str, *, convert: bool = True) -> Image.Image:
    """A PIL ``RGB`` image from a PIL image, uint8 ``(H, W[, C])`` array or ``(C, H, W)`` tensor.

    Transparency (an alpha band, or a palette/gray image with a ``transparency`` entry) is
    composited onto white, as the reference processor does. Raises :class:`ProcessorError` for
    unsupported modes or dtypes.
    """
    check_format(image, where)
    if not isinstance(image, Image.Image):
        image = _array_to_pil(image)
    try:
        image.load()  # a lazily opened file decodes here: a truncated or corrupt one fails now
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ProcessorError(f"{where} cannot be decoded ({type(exc).__name__}: {exc})",
                             hint="the image file is truncated or corrupt; open another copy") from None  # fmt: skip
    if not convert:
        if image.mode != "RGB":
            raise ProcessorError(
                f"{where} has mode {image.mode!r} and do_convert_rgb is off in preprocessor_config.json",
                hint="pass RGB images, or set do_convert_rgb to true",
            )
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray | torch.Tensor) -> Image.Image:
    """A checked uint8 array (channels last) or tensor (channels first) as a PIL image."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            array = array.permute(1, 2, 0)
        array = array.numpy()
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))


def encode_image(image: Image.Image, plan: ImageCost, settings: ImageSettings) -> torch.Tensor:
    """Resize, tile, rescale and normalize one RGB image following ``plan``.

    Returns float32 ``(n_tiles, 3, tile, tile)``: the ``rows x cols`` tiles in row-major order,
    then the global tile (just one tile when not split).
    """
    if (image.height, image.width) != plan.input_size:
        raise ProcessorError(f"internal: plan made for {plan.input_size}, image is {(image.height, image.width)}")
    resample = Image.Resampling(settings.resample)
    tile = settings.tile
    if settings.do_resize:
        image = _resize(image, plan.scaled_size, resample)
    if plan.tiles == (0, 0):
        # Not split, or small enough to be one tile: squeeze (or round up) to one tile.
        frames = [np.asarray(_resize(image, plan.resized_size, resample))]
    else:
        grid = _resize(image, plan.resized_size, resample)
        pixels = np.asarray(grid)
        rows, cols = plan.tiles
        frames = [
            pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)
        ]
        frames.append(np.asarray(_resize(grid, (tile, tile), resample)))
    table = _value_table(settings)
    out = np.empty((len(frames), 3, *frames[0].shape[:2]), dtype=np.float32)
    for k, frame in enumerate(frames):
        for c in range(3):
            out[k, c] = table[c][frame[:, :, c]]
    return torch.from_numpy(out)


def _resize(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    height, width = size
    return image.resize((width, height), resample=resample)


@functools.lru_cache(maxsize=8)
def _value_table(settings: ImageSettings) -> np.ndarray:
    """float32 ``(3, 256)``: the rescaled, normalized value of each uint8 level per channel.

    Computed with the reference's arithmetic (rescale in float64, round to float32, normalize
    in float32), so looking values up gives the same floats as computing them per pixel.
    """
    levels = np.arange(256, dtype=np.float64)
    values = (levels * settings.rescale_factor if settings.do_rescale else levels).astype(np.float32)
    values = np.broadcast_to(values, (3, 256))
    if settings.do_normalize:
        mean = np.asarray(settings.mean, dtype=np.float32)[:, None]
        std = np.asarray(settings.std, dtype=np.float32)[:, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32)


def pad_batch(samples: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-sample tile stacks into one batch.

    ``samples[b]`` holds ``(n_tiles_i, 3, h, w)`` tensors for the images of sample ``b``.
    Returns ``pixel_values`` float32 ``(B, N, 3, H, W)`` and ``pixel_attention_mask`` int64
    ``(B, N, H, W)``, where ``N`` is the most tiles of any sample and ``H, W`` the largest tile
    size; padding is zeros with mask 0, bottom/right as the reference.
    """
    if len(samples) == 1 and len(samples[0]) == 1:  # common case: no copy
        values = samples[0][0][None]
        return values, torch.ones(values.shape[:2] + values.shape[-2:], dtype=torch.int64)
    stacks = [torch.cat(images) if images else None for images in samples]
    real = [s for s in stacks if s is not None]
    n_max = max(s.shape[0] for s in real)
    height = max(s.shape[-2] for s in real)
    width = max(s.shape[-1] for s in real)
    values = torch.zeros(len(samples), n_max, 3, height, width, dtype=torch.float32)
    mask = torch.zeros(len(samples), n_max, height, width, dtype=torch.int64)
    for b, stack in enumerate(stacks):
        if stack is None:
            continue
        n, _, h, w = stack.shape
        values[b, :n, :, :h, :w] = stack
        mask[b, :n, :h, :w] = 1
    return values, mask
