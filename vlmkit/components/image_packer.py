"""Packer ``image_packer``: splice visual tokens into text embeddings at placeholder ids.

The processor expands every image into ``tokens_per_image`` copies of the placeholder id (with
framing tokens around them, which stay text). This packer replaces the placeholders of row ``b``
with the visual tokens of that row's images, in order, and checks every count first.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import PackingError
from ..hookspecs import hookimpl
from ..keymap import KeyMap

__all__ = ["ImagePacker", "ImagePackerParams"]


class ImagePackerParams(BaseModel):
    """``image_token_id``: the placeholder id (HF ``image_token_id``); ``tokens_per_image``:
    visual tokens per image (HF ``image_seq_len``), or ``None`` to take the connector's count."""

    model_config = ConfigDict(extra="forbid")

    image_token_id: int = Field(ge=0)
    tokens_per_image: int | None = Field(default=None, gt=0)


class ImagePacker(nn.Module):
    """Replace placeholder embeddings with visual tokens. Has no parameters."""

    Params = ImagePackerParams

    def __init__(self, params: ImagePackerParams, *, tokens_per_image: int) -> None:
        super().__init__()
        self.params = params
        self.image_token_id = params.image_token_id
        self.tokens_per_image = tokens_per_image

    def key_map(self) -> KeyMap:
        """No weights."""
        return KeyMap([])

    def count(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` -> ``(B,)`` placeholder count per row."""
        return (input_ids == self.image_token_id).sum(dim=1)

    def check(self, input_ids: torch.Tensor, images_per_sample: list[int]) -> None:
        """Raise :class:`PackingError` unless row ``b`` has ``images_per_sample[b] * K`` placeholders,
        in whole runs of ``K``."""
        if len(images_per_sample) != input_ids.shape[0]:
            raise PackingError(
                f"got images for {len(images_per_sample)} samples but input_ids has {input_ids.shape[0]} rows",
                hint="pass pixel_values shaped (B, N_img, 3, H, W) with the same B as input_ids",
            )
        counts = self.count(input_ids).tolist()
        k = self.tokens_per_image
        for row, (found, n_img) in enumerate(zip(counts, images_per_sample)):
            if found != n_img * k:
                raise PackingError(
                    f"sample {row}: {found} image placeholder tokens (id {self.image_token_id}) but "
                    f"{n_img} image(s) x {k} tokens per image = {n_img * k}",
                    hint="build inputs with vlmkit.load_processor(...) so each <image> is expanded "
                    "to the model's tokens per image, and pass one image per <image>",
                )
            self._check_runs(input_ids[row], row)

    def _check_runs(self, ids: torch.Tensor, row: int) -> None:
        mask = (ids == self.image_token_id).to(torch.int8)
        if not bool(mask.any()):
            return
        edges = torch.diff(mask, prepend=mask.new_zeros(1), append=mask.new_zeros(1))
        starts = torch.nonzero(edges == 1).flatten()
        ends = torch.nonzero(edges == -1).flatten()
        lengths = (ends - starts).tolist()
        for image, length in enumerate(lengths):
            if length % self.tokens_per_image:
                raise PackingError(
                    f"sample {row}: placeholder run {image} at position {int(starts[image])} has {length} tokens, "
                    f"not a multiple of {self.tokens_per_image} tokens per image",
                    hint="a truncated prompt cut an image apart; raise max length or drop the image",
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        image_tokens: torch.Tensor,
        images_per_sample: list[int],
    ) -> torch.Tensor:
        """``(B, T)``, ``(B, T, D)``, ``(N_real, K, D)`` -> ``(B, T, D)`` with placeholders replaced."""
        self.check(input_ids, images_per_sample)
        if image_tokens.shape[0] != sum(images_per_sample) or image_tokens.shape[1] != self.tokens_per_image:
            raise PackingError(
                f"got visual tokens shaped {tuple(image_tokens.shape)} for {sum(images_per_sample)} images "
                f"of {self.tokens_per_image} tokens"
            )
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        flat = image_tokens.reshape(-1, image_tokens.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask, flat)


@hookimpl
def vlmkit_register_components(registry) -> None:
    """Register the ``image_packer`` packer."""
    registry.add_packer("image_packer", ImagePacker)
