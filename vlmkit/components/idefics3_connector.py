"""``idefics3``: the Idefics3 / SmolVLM connector -- pixel shuffle then a bias-free projection.

Pixel shuffle (space-to-depth) merges each ``s x s`` block of neighbouring patches into one token
of width ``s*s*D_v``, so ``P`` patches become ``K = P / s**2`` tokens; a ``Linear`` (no bias) then
maps them to ``out_features``. Numerically identical to transformers' ``Idefics3Connector``
(``pixel_shuffle`` + ``modality_projection``).

The patch features must form a *square* grid (transformers takes ``sqrt(P)`` as the side): the
``navit`` tower always returns the full square grid, padded patches included.

Checkpoint key: ``modality_projection.proj.weight`` (``model.connector.`` in Idefics3 files, placed by the family).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import SpecError
from ..hookspecs import hookimpl
from ..keymap import KeyMap

__all__ = ["Idefics3ConnectorParams", "Idefics3Connector", "pixel_shuffle", "tokens_per_image"]


class Idefics3ConnectorParams(BaseModel):
    """``Idefics3Config.scale_factor`` (default 2): the side of the patch block merged per token."""

    model_config = ConfigDict(extra="forbid")

    scale_factor: int = Field(2, ge=1, description="Pixel-shuffle factor s; must divide the patch grid side.")


def _divisors(n: int) -> list[int]:
    from ..errors import divisors

    return divisors(n)


def tokens_per_image(grid: int, scale: int) -> int:
    """Visual tokens per image for a ``grid x grid`` patch grid merged in ``scale x scale`` blocks:
    ``(grid // scale) ** 2``. The one place this formula lives (the family's config cross-checks
    and the processor's image cost use it through the spec)."""
    return (grid // scale) ** 2


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``(N, h*h, D)`` row-major square grid -> ``(N, (h/s)**2, s*s*D)``.

    Token ``(i, j)`` of the output holds patches ``(i*s + a, j*s + b)`` for ``a, b < s``, laid out
    ``(a, b, d)`` along the feature axis -- the order transformers' ``pixel_shuffle`` produces.
    """
    n, p, d = x.shape
    side = math.isqrt(p)
    if side * side != p or side % scale:
        raise SpecError(
            f"the idefics3 connector needs a square grid of patches whose side is divisible by "
            f"scale_factor={scale}; got {p} patches per image"
            + ("" if side * side != p else f" (a {side}x{side} grid; valid scales: {_divisors(side)})"),
            key_path="connector.scale_factor",
            hint="feed full square patch grids (navit pads to image_size) or pick a scale that divides the grid",
        )
    h = side // scale
    x = x.reshape(n, h, scale, h, scale, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * h, scale * scale * d)


class Idefics3Connector(nn.Module):
    """Patch features ``(N, P, D_v)`` -> visual tokens ``(N, P/s**2, out_features)``.

    Built as ``Idefics3Connector(params, in_features=D_v, grid=patches_per_side, out_features=D)``;
    ``tokens_per_image = (grid // s) ** 2`` for the native grid.
    """

    Params = Idefics3ConnectorParams

    def __init__(self, params: Idefics3ConnectorParams, *, in_features: int, grid: int, out_features: int,
                 num_tokens: int | None = None) -> None:  # fmt: skip
        super().__init__()
        s = params.scale_factor
        tokens = self.count_tokens(params, grid=grid, num_tokens=num_tokens)
        self.params = params
        self.scale_factor = s
        self.in_features = in_features
        self.grid = grid
        self.out_features = out_features
        self.tokens_per_image = tokens
        self.proj = nn.Linear(in_features * s * s, out_features, bias=False)

    @classmethod
    def count_tokens(cls, params: Idefics3ConnectorParams, *, grid: int, num_tokens: int | None = None) -> int:
        """The declared facts (:class:`vlmkit.protocols.DeclaresTokenCount`): ``(grid // s) ** 2``
        for a square ``grid x grid`` patch grid whose side ``s`` divides; ``SpecError`` otherwise."""
        s = params.scale_factor
        if num_tokens is not None and num_tokens != grid * grid:
            raise SpecError(
                f"the idefics3 connector pixel-shuffles a square {grid}x{grid} patch grid, but the vision tower "
                f"gives {num_tokens} feature rows per image (a class token kept?)",
                key_path="connector",
                hint="use a tower setting that returns only the patch grid (e.g. vision_feature_select_strategy: default)",
            )
        if grid <= 0 or grid % s:
            raise SpecError(
                f"scale_factor={s} does not divide the vision tower's patch grid ({grid}x{grid} patches); "
                f"valid scale_factor values for this grid: {_divisors(grid) if grid > 0 else []}",
                key_path="connector.scale_factor",
                hint="choose a divisor of image_size // patch_size",
            )
        return tokens_per_image(grid, s)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, P, D_v) -> (N, P / s**2, out_features)``; ``P`` a square with side divisible by s."""
        return self.proj(pixel_shuffle(features, self.scale_factor))

    def key_map(self) -> KeyMap:
        """``proj.weight`` <- ``modality_projection.proj.weight`` (transformers' name; the family places it)."""
        return KeyMap.prefixed(self.state_dict().keys(), "", renames={"proj.weight": "modality_projection.proj.weight"})


@hookimpl
def vlmkit_register_components(registry) -> None:  # noqa: ANN001 - pluggy passes the Registry
    """Register :class:`Idefics3Connector` as connector ``idefics3``."""
    registry.add_connector("idefics3", Idefics3Connector)
