"""The five component protocols a VLM is made of.

Data flows ``pixels -> VisionTower -> Connector -> Aligner -> Packer -> Backbone -> logits``.
Components are ``torch.nn.Module`` subclasses that satisfy these protocols; each has a pydantic
``Params`` class (its typed settings, named as in Hugging Face ``config.json``) and a
``key_map()`` that maps its ``state_dict`` onto checkpoint keys.

Shape letters: ``B`` batch, ``T`` sequence length, ``N`` images, ``H, W`` pixels,
``P`` patches per image, ``K`` visual tokens per image, ``D_v`` vision width, ``D_c`` connector
width, ``D`` text width, ``V`` vocabulary.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from .keymap import KeyMap

__all__ = ["Component", "VisionTower", "Connector", "Aligner", "Packer", "Backbone", "SLOTS"]

#: The five slots in data-flow order; also the YAML top-level keys.
SLOTS = ("vision_tower", "connector", "aligner", "packer", "backbone")


@runtime_checkable
class Component(Protocol):
    """What every component has: typed params and a key map for its weights."""

    Params: ClassVar[type]
    params: Any

    def key_map(self) -> KeyMap:
        """Checkpoint key <-> ``state_dict`` key rules for this component."""
        ...


@runtime_checkable
class VisionTower(Component, Protocol):
    """Pixels -> patch features.

    Attributes: ``hidden_size`` (D_v), ``patch_size``, ``image_size`` (the square input side the
    tower was trained on), ``num_patches_per_side`` (``image_size // patch_size``).
    Optional: ``num_tokens`` (feature rows per image when they are not the square patch grid,
    e.g. a kept class token; the builder then passes it to the connector as ``num_tokens=``),
    ``image_mean`` / ``image_std`` (the normalisation the tower was trained with; the processor
    uses them for an assembled model), ``params.num_channels``. Built as ``cls(params)``.
    """

    hidden_size: int
    patch_size: int
    image_size: int
    num_patches_per_side: int

    def forward(
        self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` float, optional ``(N, H/p, W/p)`` bool -> ``(N, P, D_v)``."""
        ...


@runtime_checkable
class Connector(Component, Protocol):
    """Patch features -> visual tokens.

    Built as ``cls(params, in_features=D_v, grid=num_patches_per_side, out_features=D)`` (plus
    ``num_tokens=`` when the tower declares it); it may
    choose another ``out_features``; the aligner slot then projects to ``D`` (it is the identity
    when the widths already match).
    """

    out_features: int
    tokens_per_image: int

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, P, D_v) -> (N, K, D_c)``."""
        ...


@runtime_checkable
class Aligner(Component, Protocol):
    """Visual tokens -> the text width. Built as ``cls(params, in_features=D_c, out_features=D)``."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, K, D_c) -> (N, K, D)``."""
        ...


@runtime_checkable
class Packer(Component, Protocol):
    """Splices visual tokens into the text embeddings at the image placeholder ids.

    Built as ``cls(params, tokens_per_image=K)``. ``params.image_token_id`` is the placeholder.
    """

    image_token_id: int
    tokens_per_image: int

    def forward(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        image_tokens: torch.Tensor,
        images_per_sample: list[int],
    ) -> torch.Tensor:
        """``(B, T)``, ``(B, T, D)``, ``(N_real, K, D)`` -> ``(B, T, D)``.

        ``images_per_sample[b]`` real images belong to row ``b``, in order.
        """
        ...


@runtime_checkable
class Backbone(Component, Protocol):
    """A decoder-only language model working on embeddings.

    Attributes ``hidden_size`` (D) and ``vocab_size`` (V). Built as ``cls(params)``.
    Optional: ``generate_from_embeds(inputs_embeds, attention_mask, **gen_kwargs)`` or a
    transformers-style ``generate(inputs_embeds=...)``; see :mod:`vlmkit.generation`.
    """

    hidden_size: int
    vocab_size: int

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` long -> ``(B, T, D)``."""
        ...

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """``(B, T, D)``, optional ``(B, T_past + T)`` 0/1 mask, ``(B, T)`` positions -> ``(B, T, D)`` hidden."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, V)``."""
        ...
