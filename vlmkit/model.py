"""The VLM module: wires the five slots together. No family-specific code lives here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PackingError, ProcessorError, SpecError, VlmkitError
from .keymap import KeyMap
from .protocols import SLOTS
from .spec import VLMSpec

__all__ = ["VLM", "VLMOutput", "patch_mask_from_pixels"]


@dataclass
class VLMOutput:
    """``logits`` (B, T, V); ``loss`` (scalar) when labels were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


def patch_mask_from_pixels(pixel_attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, H, W)`` 0/1 pixel mask -> ``(N, H/p, W/p)`` bool: a patch is real if any pixel is."""
    grid = pixel_attention_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    return grid.sum(dim=(-1, -2)) > 0


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


class VLM(nn.Module):
    """A vision-language model: ``vision_tower -> connector -> aligner -> packer -> backbone``.

    Built by :func:`vlmkit.build` / :func:`vlmkit.build_from_hf`; ``spec`` is what it was built
    from and ``load_report`` what weight loading did.
    """

    def __init__(self, spec: VLMSpec, *, vision_tower, connector, aligner, packer, backbone) -> None:
        super().__init__()
        self.spec = spec
        self.vision_tower = vision_tower
        self.connector = connector
        self.aligner = aligner
        self.packer = packer
        self.backbone = backbone
        self.load_report = None
        self.last_generation = None  # a vlmkit.generation.GenerationInfo after generate()

    # ---- images -------------------------------------------------------------------------
    def encode_images(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """``(B, N, 3, H, W)`` (+ ``(B, N, H, W)`` mask) -> visual tokens ``(N_real, K, D)`` and
        real images per sample. All-zero images are padding (as transformers' processor pads)."""
        self._check_pixels(pixel_values, pixel_attention_mask)
        b, n = pixel_values.shape[:2]
        flat = pixel_values.reshape(b * n, *pixel_values.shape[2:])
        real = flat.flatten(1).ne(0).any(dim=1)
        per_sample = real.view(b, n).sum(dim=1).tolist()
        pixels = flat[real].to(_float_dtype(self.vision_tower))  # the tower's dtype (vlmkit.vision_dtype)
        patch_mask = None
        if pixel_attention_mask is not None:
            pmask = pixel_attention_mask.reshape(b * n, *pixel_attention_mask.shape[2:])[real]
            if not bool(pmask.all()):
                patch_mask = patch_mask_from_pixels(pmask, self.vision_tower.patch_size)
        text_dtype = _float_dtype(self.backbone)
        if pixels.shape[0] == 0:
            return pixels.new_zeros(0, self.packer.tokens_per_image, self.backbone.hidden_size, dtype=text_dtype), per_sample
        features = self.vision_tower(pixels, patch_mask)
        try:
            tokens = self.aligner(self.connector(features))
        except SpecError as exc:  # e.g. a patch grid the connector cannot shuffle: the pixels' fault
            raise self._pixel_size_error(pixel_values, exc.detail) from None
        if tokens.shape[1] != self.packer.tokens_per_image:
            raise self._pixel_size_error(pixel_values, f"they give {tokens.shape[1]} visual tokens per image")
        return tokens.to(text_dtype), per_sample

    def _pixel_size_error(self, pixel_values: torch.Tensor, why: str) -> ProcessorError:
        side = self.vision_tower.image_size
        h, w = pixel_values.shape[-2:]
        return ProcessorError(
            f"pixel_values of {h}x{w} pixels do not fit this model: {why}; it expects {side}x{side} images "
            f"({self.packer.tokens_per_image} visual tokens per image)",
            hint="pass the processor's pixel_values unchanged (it resizes and pads to the tower's image_size)",
        )

    def _check_pixels(self, pixel_values: Any, pixel_attention_mask: Any) -> None:
        """Raise a vlmkit error (never a torch one) for pixels the tower cannot take."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ProcessorError(f"pixel_values must be a torch.Tensor (B, N_images, 3, H, W); got {type(pixel_values).__name__}",
                                 hint="pass the processor's pixel_values (return_tensors='pt')")  # fmt: skip
        if pixel_values.dim() != 5:
            raise PackingError(
                f"pixel_values must be (B, N_images, 3, H, W); got shape {tuple(pixel_values.shape)}",
                hint="pass the processor's pixel_values unchanged",
            )
        shape, p = tuple(pixel_values.shape), self.vision_tower.patch_size
        channels = getattr(getattr(self.vision_tower, "params", None), "num_channels", None)
        problem = None
        if not pixel_values.is_floating_point():
            problem = f"dtype {pixel_values.dtype} is not floating point (raw 0-255 pixels?)"
        elif isinstance(channels, int) and shape[2] != channels:
            problem = f"{shape[2]} channel(s), but the vision tower takes {channels}"
        elif shape[3] % p or shape[4] % p:
            problem = f"height and width {shape[3]}x{shape[4]} are not multiples of the patch size {p}"
        elif not bool(torch.isfinite(pixel_values).all()):
            problem = "they hold NaN or infinite values"
        if problem:
            raise ProcessorError(f"pixel_values of shape {shape}: {problem}",
                                 hint="pass the processor's pixel_values unchanged (normalised floats, (B, N, C, H, W))")  # fmt: skip
        self._check_pixel_mask(pixel_attention_mask, shape)

    @staticmethod
    def _check_pixel_mask(mask: Any, pixel_shape: tuple[int, ...]) -> None:
        if mask is None:
            return
        want = (*pixel_shape[:2], *pixel_shape[3:])
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != want:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ProcessorError(
                f"pixel_attention_mask has shape {got}; expected {want} (B, N_images, H, W) to match "
                f"pixel_values of shape {pixel_shape}",
                hint="pass the processor's pixel_attention_mask together with its pixel_values",
            )

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, T)`` ids (+ images) -> merged input embeddings ``(B, T, D)``."""
        self._check_ids(input_ids)
        if self.device.type == "meta":
            raise VlmkitError("this model has no weights in memory (it was assembled on the meta device)",
                              hint="build it with vlmkit.build(...) / build_from_hf(...) to run it")  # fmt: skip
        embeds = self.backbone.embed(input_ids)
        if pixel_values is None:
            if bool(self.packer.count(input_ids).any()):
                raise PackingError(
                    f"input_ids hold image placeholders (id {self.packer.image_token_id}) but no pixel_values were given",
                    hint="pass the processor's pixel_values, or remove the <image> tokens",
                )
            return embeds
        tokens, per_sample = self.encode_images(pixel_values, pixel_attention_mask)
        return self.packer(input_ids, embeds, tokens, per_sample)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise VlmkitError(f"input_ids must be a (B, T) integer torch.Tensor; got {type(input_ids).__name__}",
                              hint="tokenize with vlmkit.load_processor(...) and return_tensors='pt'")  # fmt: skip
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise VlmkitError(f"input_ids must be a (B, T) integer tensor; got {input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.backbone.vocab_size):
            raise VlmkitError(
                f"input_ids hold ids outside the vocabulary [0, {self.backbone.vocab_size}): "
                f"min {int(input_ids.min())}, max {int(input_ids.max())}",
                hint="tokenize with this model's tokenizer (vlmkit.load_processor)",
            )

    @staticmethod
    def _check_aux(name: str, value: Any, input_ids: torch.Tensor) -> None:
        """``attention_mask`` / ``labels`` (``(B, T)``) and ``position_ids`` (``(B|1, T)`` or ``(T,)``)."""
        if value is None:
            return
        b, t = input_ids.shape
        ok = isinstance(value, torch.Tensor) and (name == "attention_mask" or not value.is_floating_point())
        if ok and name == "position_ids":
            ok = tuple(value.shape) in {(b, t), (1, t), (t,)}
        elif ok:
            ok = tuple(value.shape) == (b, t)
        if not ok:
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            kind = "a tensor" if name == "attention_mask" else "an integer tensor"
            raise ProcessorError(f"{name} must be {kind} shaped like input_ids {(b, t)}; got {got}",
                                 hint="pass the processor's (or collator's) tensors unchanged")  # fmt: skip

    # ---- forward ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> VLMOutput:
        """Logits ``(B, T, V)`` for the processor's tensors; with ``labels`` (B, T) also the
        mean next-token cross-entropy over labels != -100 (as transformers)."""
        self._check_ids(input_ids)
        for name, value in (("attention_mask", attention_mask), ("labels", labels), ("position_ids", position_ids)):
            self._check_aux(name, value, input_ids)
        embeds = self.embed(input_ids, pixel_values, pixel_attention_mask)
        hidden = self.backbone(embeds, attention_mask=attention_mask, position_ids=position_ids)
        logits = self.backbone.logits(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return VLMOutput(logits=logits, loss=loss)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """See :func:`vlmkit.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)

    # ---- housekeeping -------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device

    def slots(self) -> dict[str, nn.Module]:
        """Slot name -> component, in data-flow order."""
        return {slot: getattr(self, slot) for slot in SLOTS}

    def key_map(self) -> dict[str, KeyMap]:
        """Slot -> that component's key map."""
        return {slot: module.key_map() for slot, module in self.slots().items()}

    def freeze(self, *slots: str) -> VLM:
        """Stop gradients for the parameters of ``slots`` (e.g. ``"vision_tower", "backbone"``)."""
        for slot in slots:
            if slot not in SLOTS:
                raise VlmkitError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
            for p in getattr(self, slot).parameters():
                p.requires_grad_(False)
        return self

    def untrained_parameters(self) -> dict[str, list[str]]:
        """Slot -> parameter names that got no pretrained weights (new, or reshaped by a swap)."""
        if self.load_report is None:
            return {slot: [n for n, _ in m.named_parameters()] for slot, m in self.slots().items() if any(True for _ in m.parameters())}
        return {k: list(v) for k, v in self.load_report.fresh.items() if v}

    def parameter_counts(self) -> dict[str, int]:
        """Slot -> number of parameters (tied weights counted once)."""
        return {slot: sum(p.numel() for p in m.parameters()) for slot, m in self.slots().items()}

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a Hugging Face checkpoint folder; see :func:`vlmkit.export.save_hf`."""
        from .export import save_hf

        return save_hf(self, folder)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, t]`` against ``labels[:, t+1]`` over non-ignored labels."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)
