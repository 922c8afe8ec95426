"""The LLaVA family's image side, as transformers' ``LlavaProcessor`` with a CLIP image processor.

- Settings: the CLIP image processor's (:class:`~vlmkit.components.clip_image.ClipImageSettings`),
  read from ``processor_config.json``'s ``image_processor`` section (what transformers 5's
  ``save_pretrained`` writes) or from ``preprocessor_config.json`` (published llava-hf files);
  ``patch_size``, ``vision_feature_select_strategy``, ``num_additional_image_tokens`` and
  ``image_token`` from ``processor_config.json``, cross-checked with ``config.json`` (a
  ``processor_config.json`` without ``patch_size`` / ``vision_feature_select_strategy`` takes
  ``config.json``'s; transformers would then fail, or count the class token the model drops).
- Cost of one image: its output is one ``(3, H, W)`` tile (``H, W``: the crop size with center
  crop on); it costs ``(H // patch) * (W // patch) + num_additional_image_tokens`` image tokens,
  minus 1 with strategy ``default`` -- transformers' ``LlavaProcessor.replace_image_token``.
- Prompt: each ``<image>`` becomes that many copies of the image token (:class:`LlavaLayout`).
- Pixels: :func:`vlmkit.components.clip_image.preprocess`, bit-exact with ``CLIPImageProcessorPil``.
  The processor stacks each prompt's tiles into ``pixel_values`` ``(B, N, 3, H, W)`` (zero
  padded, ``pixel_attention_mask`` ``(B, N, H, W)`` marks real ones), which ``VLM.forward`` takes;
  transformers' ``(N_total, 3, H, W)`` is ``torch.cat([pv[b, :n_b] for b in range(B)])`` with
  ``n_b`` the images of prompt ``b``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ProcessorError, SpecError
from ..processor.call_plan import IMAGE_SETTING_KEYWORDS
from ..processor.image import ImageCost
from .clip_image import ClipImageSettings, preprocess, resized_size

__all__ = ["LlavaImageProcessing", "LlavaLayout", "read_llava_processing", "STRATEGIES"]

#: transformers' ``vision_feature_select_strategy`` values (``None``: no class token dropped).
STRATEGIES = ("default", "full")

#: per-call image keyword -> the ClipImageSettings field it overrides for one call (the same names).
_SETTING_FIELDS = {k: k for k in IMAGE_SETTING_KEYWORDS}


@dataclass(frozen=True)
class LlavaImageProcessing:
    """A LLaVA checkpoint's image processing (a :class:`vlmkit.family.ImageProcessing`)."""

    settings: ClipImageSettings
    patch_size: int
    num_additional_image_tokens: int
    strategy: str | None
    image_token: str
    image_seq_len: int
    #: ``(height, width)`` of the tile the tower receives at the checkpoint's settings (the crop size;
    #: with center crop off, config.json's ``vision_config.image_size`` square, the nominal size).
    input_size: tuple[int, int]
    #: per-call image keywords taken (the others are refused by name).
    keywords: ClassVar[frozenset[str]] = frozenset({*_SETTING_FIELDS, "max_visual_tokens", "device", "disable_grouping"})

    def call_settings(self, options: Mapping[str, Any]) -> ClipImageSettings:
        """``settings`` with this call's image keywords (already checked) applied."""
        updates = {field: options[key] for key, field in _SETTING_FIELDS.items() if options.get(key) is not None}
        return dataclasses.replace(self.settings, **updates) if updates else self.settings

    def tokens(self, height: int, width: int) -> int:
        """Image tokens of one ``(3, height, width)`` tile, as ``LlavaProcessor.replace_image_token``."""
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return count - 1 if self.strategy == "default" else count

    def plan(self, size: tuple[int, int], settings: ClipImageSettings) -> ImageCost:
        """The cost of an image of ``size = (height, width)``: one tile of the output size."""
        resized = resized_size(size[0], size[1], settings)
        out = settings.crop_size if settings.do_center_crop else resized
        count = self.tokens(*out)
        if count <= 0:
            raise ProcessorError(
                f"an image of {size[0]}x{size[1]} px (height x width) becomes a {out[0]}x{out[1]} tile, which gives "
                f"{count} image tokens at patch size {self.patch_size}",
                hint="pass a larger image, or turn do_resize on",
            )
        return ImageCost((0, 0), 1, count, out, size, resized)

    def encode(self, image: Any, cost: ImageCost, settings: ClipImageSettings, where: str) -> torch.Tensor:
        """One image -> float32 ``(1, 3, H, W)`` (``(H, W) = cost.resized_size``)."""
        pixels = preprocess(image, settings, where=where)
        if tuple(pixels.shape[-2:]) != cost.resized_size:
            raise ProcessorError(f"internal: {where} was planned as {cost.resized_size}, encoded {tuple(pixels.shape)}")
        return pixels[None]


@dataclass(frozen=True)
class LlavaLayout:
    """LLaVA's prompt layout (a :class:`vlmkit.family.PromptLayout`): ``image`` repeated once per image token."""

    image: str

    def expand(self, cost: ImageCost, image_seq_len: int) -> str:
        return self.image * cost.visual_tokens

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every token string :meth:`expand` writes: the image token alone."""
        return (self.image,)

    def fits(self, cost: ImageCost) -> bool:
        return True  # no tile-position tokens


def _image_processor_config(folder: Path, pre: Mapping[str, Any] | None, proc: Mapping[str, Any]) -> tuple[dict, str]:
    """The CLIP image processor settings and the file they are read from."""
    nested = proc.get("image_processor")
    proc_name, pre_name = str(folder / "processor_config.json"), str(folder / "preprocessor_config.json")
    if nested is not None and not isinstance(nested, Mapping):
        raise SpecError(f"expected a mapping of image processor settings, got {type(nested).__name__}",
                        key_path="image_processor", source=proc_name)  # fmt: skip
    if nested is not None and pre is not None and dict(nested) != dict(pre):
        raise SpecError(
            "processor_config.json has an image_processor section and preprocessor_config.json exists too, "
            "with different settings: the image processing is ambiguous",
            key_path="image_processor",
            source=f"{proc_name} vs {pre_name}",
            hint="delete one of them (transformers 5 writes the section; older files have preprocessor_config.json)",
        )
    if nested is not None:
        return dict(nested), proc_name
    if pre is None:
        raise SpecError(
            "no image processor settings: neither preprocessor_config.json nor an image_processor section in "
            "processor_config.json",
            source=str(folder),
            hint="save the checkpoint's LlavaProcessor (processor.save_pretrained(folder)) into the folder",
        )
    return dict(pre), pre_name


def _int(proc: Mapping[str, Any], key: str, source: str, *, minimum: int) -> int | None:
    value = proc.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise SpecError(f"expected an integer >= {minimum}, got {value!r}", key_path=key, source=source)
    return value


def _cross_check(key: str, ours: Any, config_key: str, theirs: Any, source: str, config_name: str) -> Any:
    """``ours`` (processor_config.json), or ``theirs`` (config.json) when absent; both given must agree."""
    if ours is not None and theirs is not None and ours != theirs:
        raise SpecError(
            f"{key}={ours!r} in {source} but {config_key}={theirs!r} in {config_name}; the prompt would get the "
            "wrong number of image tokens",
            key_path=key,
            source=f"{source} vs {config_name}",
            hint="use the processor_config.json and config.json of the same checkpoint",
        )
    return ours if ours is not None else theirs


def read_llava_processing(
    folder: Path, preprocessor_config: Mapping[str, Any] | None, processor_config: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
) -> LlavaImageProcessing:  # fmt: skip
    """The :class:`LlavaImageProcessing` of the checkpoint files in ``folder``; ``SpecError`` names a bad key."""
    proc, config = dict(processor_config or {}), dict(config or {})
    source, config_name = str(folder / "processor_config.json"), str(folder / "config.json")
    image_cfg, image_source = _image_processor_config(folder, preprocessor_config, proc)
    settings = ClipImageSettings.from_config(image_cfg, image_source)
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), Mapping) else {}
    patch = _cross_check("patch_size", _int(proc, "patch_size", source, minimum=1),
                         "vision_config.patch_size", vision.get("patch_size"), source, config_name)  # fmt: skip
    if not isinstance(patch, int) or isinstance(patch, bool) or patch <= 0:
        raise SpecError(f"no usable patch size ({patch!r}) in processor_config.json or config.json vision_config",
                        key_path="patch_size", source=source, hint="add the vision tower's patch_size")  # fmt: skip
    strategy = proc.get("vision_feature_select_strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise SpecError(f"vision_feature_select_strategy={strategy!r} is not one of {list(STRATEGIES)}",
                        key_path="vision_feature_select_strategy", source=source)  # fmt: skip
    strategy = _cross_check("vision_feature_select_strategy", strategy, "vision_feature_select_strategy",
                            config.get("vision_feature_select_strategy"), source, config_name)  # fmt: skip
    extra = _int(proc, "num_additional_image_tokens", source, minimum=0) or 0
    token = proc.get("image_token", "<image>")
    if not isinstance(token, str) or not token:
        raise SpecError(f"expected the image placeholder string, got {token!r}", key_path="image_token", source=source)
    nominal = settings.output_size or (vision.get("image_size"),) * 2
    if not all(isinstance(v, int) and v > 0 for v in nominal):
        raise SpecError("cannot tell the image size: center crop is off and config.json has no vision_config.image_size",
                        source=str(folder), hint="add vision_config.image_size to config.json")  # fmt: skip
    side = LlavaImageProcessing(settings, patch, extra, strategy, token, image_seq_len=0, input_size=tuple(nominal))
    return dataclasses.replace(side, image_seq_len=side.tokens(*nominal))
