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

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from .keymap import KeyMap

__all__ = [
    "Component", "VisionTower", "Connector", "Aligner", "Packer", "Backbone", "SLOTS",
    "TowerGeometry", "TextWidths", "DeclaresGeometry", "DeclaresTokenCount", "DeclaresWidths",
]  # fmt: skip

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
    Optional classmethod ``geometry(params) -> TowerGeometry`` (:class:`DeclaresGeometry`): the
    same numbers from the params alone, so a processor needs no tower built.
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
    when the widths already match). Optional classmethod ``count_tokens(params, *, grid,
    num_tokens=None) -> int`` (:class:`DeclaresTokenCount`): ``tokens_per_image`` from the params
    and the tower's geometry alone.
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
    Optional classmethod ``widths(params) -> TextWidths`` (:class:`DeclaresWidths`) when they are not
    the params' own ``hidden_size`` / ``vocab_size`` fields.
    Optional: ``generate_from_embeds(inputs_embeds, attention_mask, **gen_kwargs)`` or a
    transformers-style ``generate(inputs_embeds=...)``; see :mod:`vlmkit.generation`.
    Optional: ``native_decode(scheme) -> bool``, whether a one-token step with ``scheme``'s layers
    (``fp32``, ``w8``, ``w4``, ``w8a8``) runs as one native call (:mod:`vlmkit.native`); the
    ``int8`` choice (:func:`vlmkit.scheme_choice.choose_int8`) weighs it.
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


# ---------------------------------------------------------------- declared facts
# What the processor (and the wiring) need to know about a model, computable from the params
# without instantiating a module. Optional: vlmkit.facts falls back to building just that slot
# on the meta device (never the backbone) for a component that declares nothing.


@dataclass(frozen=True)
class TowerGeometry:
    """A vision tower's image geometry and output width, as its instance attributes would say.

    ``image_size`` the square input side (pixels), ``patch_size``, ``num_patches_per_side``
    (``image_size // patch_size``), ``hidden_size`` the width D_v of its ``(N, K, D_v)`` output,
    ``num_tokens`` K when it is not ``num_patches_per_side ** 2`` (``None``: the square grid),
    ``image_mean`` / ``image_std`` the normalisation it was trained with (``None``: not declared;
    the processor then keeps the checkpoint's ``preprocessor_config.json`` values).
    """

    image_size: int
    patch_size: int
    num_patches_per_side: int
    hidden_size: int
    num_tokens: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None

    @property
    def tokens(self) -> int:
        """Feature rows per image at ``image_size``: ``num_tokens``, or the square patch grid."""
        return self.num_patches_per_side**2 if self.num_tokens is None else self.num_tokens


@dataclass(frozen=True)
class TextWidths:
    """A backbone's text width D (``hidden_size``) and vocabulary V (``vocab_size``)."""

    hidden_size: int
    vocab_size: int


@runtime_checkable
class DeclaresGeometry(Protocol):
    """A vision tower class that states its :class:`TowerGeometry` from its params alone.

    Its instances' ``image_size``, ``patch_size``, ``num_patches_per_side``, ``hidden_size``,
    ``num_tokens``, ``image_mean`` / ``image_std`` must be the same numbers (the wiring checks it).
    """

    @classmethod
    def geometry(cls, params: Any) -> TowerGeometry:
        """The geometry ``cls(params)`` will have; a bad combination raises ``SpecError``."""
        ...


@runtime_checkable
class DeclaresTokenCount(Protocol):
    """A connector class that states its ``tokens_per_image`` from its params and the tower's grid."""

    @classmethod
    def count_tokens(cls, params: Any, *, grid: int, num_tokens: int | None = None) -> int:
        """Visual tokens per image K for a ``grid x grid`` patch grid (``num_tokens`` feature rows
        when the tower declares them); a grid it cannot take raises ``SpecError``."""
        ...


@runtime_checkable
class DeclaresWidths(Protocol):
    """A backbone class whose widths are not plain ``hidden_size`` / ``vocab_size`` params."""

    @classmethod
    def widths(cls, params: Any) -> TextWidths:
        """The ``hidden_size`` and ``vocab_size`` ``cls(params)`` will have."""
        ...
