"""How the Idefics3 / SmolVLM family writes an image into the prompt (building blocks of the
``idefics3`` family; this module is no plugin).

An image split into ``rows x cols`` tiles becomes, per row,
``(<fake_token_around_image><row_r_col_c><image>*seq_len) * cols + "\\n"``, then
``"\\n<fake_token_around_image><global-img><image>*seq_len<fake_token_around_image>"``; an unsplit
image is just the last part without the leading newline. Token names are the reference
processor's; each can be overridden by the same key in ``tokenizer_config.json`` (top level or
``extra_special_tokens``), and every id comes from the tokenizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from ..processor.image import ImageCost, ImageSettings
from ..processor.text import SpecWarning, TextTokenizer, token_text

__all__ = ["LAYOUT_TOKEN_NAMES", "TILE_TOKEN_FORMAT", "ImageTokenLayout", "layout_token_names", "tile_grid", "image_layout"]

#: Names of the framing tokens, as the reference processor spells them.
LAYOUT_TOKEN_NAMES = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
#: Tile position tokens: ``<row_{row}_col_{col}>`` with 1-based row and column.
TILE_TOKEN_FORMAT = "<row_{row}_col_{col}>"


@dataclass(frozen=True)
class ImageTokenLayout:
    """The token strings that frame an image in the prompt, and the largest tile grid they allow
    (a :class:`vlmkit.family.PromptLayout`)."""

    image: str
    fake: str
    global_image: str
    tile_format: str
    max_rows: int
    max_cols: int

    def expand(self, cost: ImageCost, image_seq_len: int) -> str:
        """The text that replaces one image placeholder."""
        run = self.image * image_seq_len
        glob = f"{self.fake}{self.global_image}{run}{self.fake}"
        rows, cols = cost.tiles
        if rows == 0 and cols == 0:
            return glob
        lines = [
            "".join(f"{self.fake}{self.tile_format.format(row=r + 1, col=c + 1)}{run}" for c in range(cols)) + "\n"
            for r in range(rows)
        ]
        return "".join(lines) + "\n" + glob

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every token string :meth:`expand` can write: the image, fake and global tokens, each tile token."""
        tiles = [self.tile_format.format(row=r, col=c) for r in range(1, self.max_rows + 1) for c in range(1, self.max_cols + 1)]
        return (self.image, self.fake, self.global_image, *tiles)

    def fits(self, cost: ImageCost) -> bool:
        """Whether the tokenizer has a tile token for every tile of ``cost.tiles``."""
        rows, cols = cost.tiles
        return rows <= self.max_rows and cols <= self.max_cols


def layout_token_names(config: Mapping[str, Any]) -> dict[str, str]:
    """The framing token names: defaults, overridden by ``tokenizer_config.json`` entries."""
    extra = config.get("extra_special_tokens")
    extra = extra if isinstance(extra, Mapping) else {}
    names = dict(LAYOUT_TOKEN_NAMES)
    for key in names:
        value = token_text(config.get(key)) or token_text(extra.get(key))
        if value:
            names[key] = value
    return names


def tile_grid(tokenizer: TextTokenizer, tile_format: str) -> tuple[int, int]:
    """Largest ``(rows, cols)`` such that every ``tile_format`` token of that grid exists."""
    rows = 0
    while tokenizer.token_to_id(tile_format.format(row=rows + 1, col=1)) is not None:
        rows += 1
    cols = 0
    while tokenizer.token_to_id(tile_format.format(row=1, col=cols + 1)) is not None:
        cols += 1
    complete = all(
        tokenizer.token_to_id(tile_format.format(row=r, col=c)) is not None
        for r in range(1, rows + 1)
        for c in range(1, cols + 1)
    )
    return (rows, cols) if complete else (0, 0)


def image_layout(tokenizer: TextTokenizer, settings: ImageSettings, rows: int) -> ImageTokenLayout:
    """The checked layout for ``tokenizer``: every framing token it needs is an added token with
    an id inside the ``rows``-row embedding (a :class:`SpecError` otherwise)."""
    names = layout_token_names(tokenizer.config)
    max_rows, max_cols = tile_grid(tokenizer, TILE_TOKEN_FORMAT)
    needed = [names["fake_image_token"], names["global_image_token"]]
    if settings.do_image_splitting or max_rows:
        needed.append(TILE_TOKEN_FORMAT.format(row=1, col=1))
    missing = [t for t in needed if not tokenizer.is_added(t)]
    if missing:
        raise SpecError(
            f"the tokenizer lacks the image framing token(s) {', '.join(missing)} the Idefics3 layout needs"
            + (" (do_image_splitting is on in preprocessor_config.json)" if settings.do_image_splitting else ""),
            source=tokenizer.source,
            hint="use the tokenizer files that came with the checkpoint",
        )
    beyond = [t for t in needed if tokenizer.token_to_id(t) >= rows]
    if beyond:
        raise SpecError(
            f"framing token(s) {', '.join(beyond)} have ids beyond the {rows}-row embedding", source=tokenizer.source
        )
    not_special = [t for t in needed + [names["image_token"]] if not tokenizer.is_special(t)]
    if not_special:
        warnings.warn(
            f"{tokenizer.source}: image token(s) {', '.join(not_special)} are not marked special; they are still "
            "matched whole, but decode(skip_special_tokens=True) will keep them",
            SpecWarning,
            stacklevel=5,
        )
    return ImageTokenLayout(
        image=names["image_token"],
        fake=names["fake_image_token"],
        global_image=names["global_image_token"],
        tile_format=TILE_TOKEN_FORMAT,
        max_rows=max_rows,
        max_cols=max_cols,
    )
