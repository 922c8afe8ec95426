"""The tiled image side's checks, with messages that say which option fits: an image cut into
more tiles than the tokenizer has tile tokens for, and an image over ``max_visual_tokens``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ProcessorError
from .image import ImageCost, plan_image

__all__ = ["check_grid", "largest_edge", "over_budget"]


def largest_edge(size: tuple[int, int], plan: Any, image_seq_len: int, fits: Callable[[ImageCost], bool]) -> int | None:
    """The largest whole-tile ``longest_edge`` below ``plan``'s whose tiling satisfies ``fits``."""
    tile = plan.settings.tile
    for edge in range((plan.longest_edge - 1) // tile * tile, 0, -tile):
        if fits(plan_image(size, plan.settings, image_seq_len, split=True, longest_edge=edge)):
            return edge
    return None


def check_grid(layout: Any, cost: ImageCost, where: str, plan: Any, image_seq_len: int) -> None:
    """Raise :class:`ProcessorError` when the tokenizer has no tile tokens for ``cost.tiles``."""
    if layout.fits(cost):
        return
    edge = largest_edge(cost.input_size, plan, image_seq_len, layout.fits)
    last = layout.tile_format.format(row=layout.max_rows, col=layout.max_cols) if layout.max_rows else "none"
    raise ProcessorError(
        f"{where} ({cost.input_size[0]}x{cost.input_size[1]} px, height x width) would be cut into "
        f"{cost.tiles[0]} x {cost.tiles[1]} tiles at longest_edge={plan.longest_edge}, but the tokenizer only "
        f"has tile tokens up to {last}",
        hint=(f"pass longest_edge={edge} (or less), or " if edge else "pass ") + "do_image_splitting=False",
    )


def over_budget(where: str, cost: ImageCost, limit: int, plan: Any, image_seq_len: int, *, tiled: bool) -> tuple[str, str]:
    """The message and hint of a ProcessorError for an image over ``max_visual_tokens``
    (``tiled``: the default tiled image side, whose options can shrink the cost)."""
    rows, cols = cost.tiles
    tiles = f"{rows} x {cols} tiles + 1 global tile" if rows else "1 tile"
    msg = (
        f"{where} ({cost.input_size[0]}x{cost.input_size[1]} px, height x width) costs {cost.visual_tokens} "
        f"visual tokens ({tiles} of {image_seq_len}), over max_visual_tokens={limit}"
    )
    if not tiled:
        return msg, "pass a smaller image, or raise max_visual_tokens"
    edge = largest_edge(cost.input_size, plan, image_seq_len, lambda c: c.visual_tokens <= limit) if plan.split else None
    if limit < image_seq_len:
        fix = f"one tile costs {image_seq_len} tokens, so raise max_visual_tokens to at least that"
    elif edge is not None:
        fix = f"pass longest_edge={edge} (or less), or do_image_splitting=False ({image_seq_len} tokens)"
    else:
        fix = f"pass do_image_splitting=False ({image_seq_len} tokens), or raise max_visual_tokens"
    return msg, fix
