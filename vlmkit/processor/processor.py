"""The :class:`Processor`: prompts and images in, model inputs out.

``processor(text=..., images=...)`` returns ``input_ids`` ``(B, L)``, ``attention_mask``
``(B, L)``, ``pixel_values`` ``(B, N, 3, H, W)`` and ``pixel_attention_mask`` ``(B, N, H, W)``
laid out as the checkpoint's transformers processor does (the prompt layout is the family's). The token cost of every image is worked
out from its size before any pixel is touched, so :meth:`Processor.image_cost`,
:meth:`Processor.prompt_cost` and the ``max_visual_tokens`` guard are cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ProcessorError
from .checks import CheckedSpec
from .image import ImageCost, ImageSettings, check_format, encode_image, image_size, pad_batch, plan_image, to_rgb
from .inputs import as_nested_images, as_texts, check_limit, normalize_messages, padding_mode
from .loading import load_processor
from .outputs import ProcessorOutput, PromptCost
from .text import ChatTemplate, TextTokenizer
from .video_prompt import (
    as_nested_videos, check_rendered_videos, check_video_budget, encode_video, expand_videos, media_order,
    merge_media, plan_videos, video_template,
)  # fmt: skip

__all__ = ["Processor", "ProcessorOutput", "PromptCost", "load_processor"]


class Processor:
    """Turns prompts and images into model inputs. Build with :func:`load_processor`."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        settings: ImageSettings,
        spec: CheckedSpec,
        *,
        chat_template: ChatTemplate | None = None,
        max_visual_tokens: int | None = None,
        video_layout: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.video = video_layout  # the family's VideoLayout, or None: the checkpoint takes no video
        self.settings = settings
        self.spec = spec
        self.template = chat_template
        self.max_visual_tokens = check_limit(max_visual_tokens)

    # ---------------------------------------------------------------- facts

    @property
    def image_token(self) -> str:
        """The placeholder string users write in prompts (the family's, e.g. ``<image>``)."""
        return self.spec.layout.image

    @property
    def video_token(self) -> str | None:
        """The video placeholder (``<video>``), or ``None`` when the checkpoint takes no video."""
        return None if self.video is None else self.video.video

    @property
    def image_token_id(self) -> int:
        return self.spec.image_token_id

    @property
    def image_seq_len(self) -> int:
        """Image tokens per tile."""
        return self.spec.image_seq_len

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: generation_config.json's eos, config.json's and the family's turn-end tokens."""
        return list(self.spec.eos_token_ids)

    @property
    def pad_token_id(self) -> int | None:
        return self.spec.pad_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.spec.bos_token_id

    @property
    def chat_template(self) -> str | None:
        return None if self.template is None else self.template.text

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"Processor(image_seq_len={self.image_seq_len}, tile={s.tile}, longest_edge={s.longest_edge}, "
            f"do_image_splitting={s.do_image_splitting}, tokenizer={self.tokenizer!r})"
        )

    # ---------------------------------------------------------------- cost preflight

    def image_cost(
        self, image_or_size: Any, *, do_image_splitting: bool | None = None, longest_edge: int | None = None
    ) -> ImageCost:
        """Token cost of one image, from a PIL image / array or a ``(height, width)`` tuple. No pixel work."""
        if isinstance(image_or_size, tuple) and len(image_or_size) == 2:
            size = tuple(int(v) for v in image_or_size)
            if min(size) <= 0:
                raise ProcessorError(f"image size {image_or_size} (height, width) is empty", hint="sizes must be >= 1")
        else:
            size = image_size(image_or_size, "the image")
            check_format(image_or_size, "the image")
        split, longest = self._options(do_image_splitting, longest_edge)
        cost = plan_image(size, self.settings, self.image_seq_len, split=split, longest_edge=longest)
        self._check_grid(cost, "the image", longest)
        return cost

    def prompt_cost(
        self,
        text: str | Sequence[str],
        images: Any = None,
        *,
        do_image_splitting: bool | None = None,
        longest_edge: int | None = None,
        videos: Any = None,
        fps: float | None = None,
        max_frames: int | None = None,
    ) -> PromptCost | list[PromptCost]:
        """Token count of a prompt (or a list of prompts) with its images and videos, without any
        pixel work (videos: headers only, no frame decoded)."""
        texts, nested = self._layout_inputs(text, images)
        split, longest = self._options(do_image_splitting, longest_edge)
        costs = self._plan(nested, split, longest, limit=None)
        clips = self._videos(texts, videos, fps, max_frames, limit=None)
        out = []
        for prompt, image_costs, row in zip(texts, costs, clips):
            total = len(self.tokenizer.encode(self._expand(prompt, image_costs, row)))
            visual = sum(c.visual_tokens for c in image_costs) + sum(v.visual_tokens for v in row)
            out.append(PromptCost(total, total - visual, visual, tuple(image_costs), tuple(v.plan for v in row)))
        return out[0] if isinstance(text, str) else out

    # ---------------------------------------------------------------- main call

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        *,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        do_image_splitting: bool | None = None,
        longest_edge: int | None = None,
        max_visual_tokens: int | None = None,
        add_special_tokens: bool = True,
        videos: Any = None,
        fps: float | None = None,
        max_frames: int | None = None,
    ) -> ProcessorOutput:
        """Tokenize ``text`` with its ``images`` expanded; encode the images.

        ``images`` is an image, a flat list (shared out over the prompts by their ``<image>``
        counts) or one list per prompt. Returns ``input_ids``/``attention_mask`` ``(B, L)`` and
        ``pixel_values`` float32 ``(B, N, 3, H, W)``/``pixel_attention_mask`` int64
        ``(B, N, H, W)``; ``return_tensors=None`` gives lists for the text fields.

        ``videos`` (video file paths or :class:`~vlmkit.processor.video.Video` objects, one per
        ``<video>`` placeholder) are sampled at ``fps`` frames per second, at most ``max_frames``
        (default: the checkpoint's); each frame is one tile of ``pixel_values``, in prompt order.
        """
        if return_tensors not in ("pt", None):
            raise ProcessorError(f"return_tensors={return_tensors!r} is not supported", hint="use 'pt' or None")
        pad = padding_mode(padding)
        texts, nested = self._layout_inputs(text, images)
        split, longest = self._options(do_image_splitting, longest_edge)
        limit = self.max_visual_tokens if max_visual_tokens is None else check_limit(max_visual_tokens)
        costs = self._plan(nested, split, longest, limit=limit)  # raises before any pixel work
        clips = self._videos(texts, videos, fps, max_frames, limit=limit)  # headers only
        out = ProcessorOutput()
        if texts is not None:
            ids = self.tokenizer.encode_batch(
                [self._expand(t, c, v) for t, c, v in zip(texts, costs, clips)], add_special_tokens=add_special_tokens
            )
            out.update(self._pad_ids(ids, pad, return_tensors))
        if any(nested) or any(clips):
            out.update(self._pixels(nested, costs, clips, texts))
        return out

    def _videos(self, texts: list[str] | None, videos: Any, fps: Any, max_frames: Any, *, limit: int | None) -> list:
        """Each prompt's videos, opened and sampled (headers only; see :mod:`.video_prompt`)."""
        nested = as_nested_videos(videos, texts, self.video_token)
        clips = plan_videos(nested, self.video, self.settings, self.image_seq_len, fps=fps, max_frames=max_frames)
        check_video_budget(clips, limit)
        return clips

    def _options(self, do_image_splitting: bool | None, longest_edge: int | None) -> tuple[bool, int]:
        split = self.settings.do_image_splitting if do_image_splitting is None else bool(do_image_splitting)
        longest = self.settings.longest_edge if longest_edge is None else longest_edge
        if not isinstance(longest, (int, np.integer)) or isinstance(longest, bool) or longest <= 0:
            raise ProcessorError(f"longest_edge must be a positive number of pixels, got {longest_edge!r}")
        return split, int(longest)

    def _layout_inputs(self, text: Any, images: Any) -> tuple[list[str] | None, list[list[Any]]]:
        """Normalize to a list of prompts and one list of images per prompt; check the counts."""
        if text is None and images is None:
            raise ProcessorError("nothing to process: pass text=, images= or both (videos= go with a text= prompt)")
        texts = as_texts(text)
        nested = as_nested_images(images, texts, self.image_token)
        if texts is None:
            return None, nested
        if len(nested) != len(texts):
            raise ProcessorError(
                f"{len(texts)} prompt(s) but {len(nested)} list(s) of images",
                hint="pass one list of images per prompt (an empty list for a prompt without images)",
            )
        for i, (prompt, imgs) in enumerate(zip(texts, nested)):
            n = prompt.count(self.image_token)
            if n != len(imgs):
                raise ProcessorError(
                    f"sample {i}: the prompt has {n} {self.image_token} placeholder(s) but {len(imgs)} image(s) "
                    "were given for it",
                    hint=f"write one {self.image_token} in the text per image, in order "
                    "(apply_chat_template inserts them for {'type': 'image'} items)",
                )
        return texts, nested

    def _plan(self, nested: list[list[Any]], split: bool, longest: int, *, limit: int | None) -> list[list[ImageCost]]:
        """Each image's plan, checking type, size, mode, tile tokens and the token budget."""
        plans = []
        for i, imgs in enumerate(nested):
            row = []
            for j, img in enumerate(imgs):
                where = f"image {j} of sample {i}"
                size = image_size(img, where)
                check_format(img, where)
                cost = plan_image(size, self.settings, self.image_seq_len, split=split, longest_edge=longest)
                self._check_grid(cost, where, longest)
                if limit is not None and cost.visual_tokens > limit:
                    msg, fix = self._over_budget(where, cost, limit, split, longest)
                    raise ProcessorError(msg, hint=fix)
                row.append(cost)
            plans.append(row)
        return plans

    def _over_budget(self, where: str, cost: ImageCost, limit: int, split: bool, longest: int) -> tuple[str, str]:
        """The message and hint of a ProcessorError for an image over ``max_visual_tokens``."""
        rows, cols = cost.tiles
        tiles = f"{rows} x {cols} tiles + 1 global tile" if rows else "1 tile"
        msg = (
            f"{where} ({cost.input_size[0]}x{cost.input_size[1]} px, height x width) costs {cost.visual_tokens} "
            f"visual tokens ({tiles} of {self.image_seq_len}), over max_visual_tokens={limit}"
        )
        edge = self._largest_edge(cost.input_size, longest, lambda c: c.visual_tokens <= limit) if split else None
        if limit < self.image_seq_len:
            fix = f"one tile costs {self.image_seq_len} tokens, so raise max_visual_tokens to at least that"
        elif edge is not None:
            fix = f"pass longest_edge={edge} (or less), or do_image_splitting=False ({self.image_seq_len} tokens)"
        else:
            fix = f"pass do_image_splitting=False ({self.image_seq_len} tokens), or raise max_visual_tokens"
        return msg, fix

    def _check_grid(self, cost: ImageCost, where: str, longest: int) -> None:
        """Raise :class:`ProcessorError` when the tokenizer has no tile tokens for ``cost.tiles``."""
        layout = self.spec.layout
        if layout.fits(cost):
            return
        edge = self._largest_edge(cost.input_size, longest, layout.fits)
        last = layout.tile_format.format(row=layout.max_rows, col=layout.max_cols) if layout.max_rows else "none"
        raise ProcessorError(
            f"{where} ({cost.input_size[0]}x{cost.input_size[1]} px, height x width) would be cut into "
            f"{cost.tiles[0]} x {cost.tiles[1]} tiles at longest_edge={longest}, but the tokenizer only has tile "
            f"tokens up to {last}",
            hint=(f"pass longest_edge={edge} (or less), or " if edge else "pass ") + "do_image_splitting=False",
        )

    def _largest_edge(self, size: tuple[int, int], longest: int, fits: Any) -> int | None:
        """The largest whole-tile ``longest_edge`` below ``longest`` whose plan satisfies ``fits``."""
        tile = self.settings.tile
        for edge in range((longest - 1) // tile * tile, 0, -tile):
            if fits(plan_image(size, self.settings, self.image_seq_len, split=True, longest_edge=edge)):
                return edge
        return None

    def _expand(self, prompt: str, costs: list[ImageCost], videos: Sequence[Any] = ()) -> str:
        """Replace the i-th image placeholder in ``prompt`` with the token layout of ``costs[i]``,
        then the video placeholders with the family's text for ``videos``."""
        parts = prompt.split(self.image_token)
        pieces = [parts[0]]
        for cost, rest in zip(costs, parts[1:]):
            pieces.append(self.spec.layout.expand(cost, self.image_seq_len))
            pieces.append(rest)
        return expand_videos("".join(pieces), list(videos), self.video, self.image_seq_len)

    def _pad_ids(self, ids: list[list[int]], pad: bool, return_tensors: str | None) -> dict[str, Any]:
        """Pad to the longest sequence on the tokenizer's padding side; ``(B, L)`` tensors or lists."""
        longest = max(len(seq) for seq in ids)
        masks = [[1] * len(seq) for seq in ids]
        if pad and any(len(seq) != longest for seq in ids):
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ProcessorError(
                    "the prompts have different lengths and the checkpoint names no pad token",
                    hint="pass padding=False and process the prompts one at a time",
                )
            left = self.tokenizer.padding_side == "left"
            for k, seq in enumerate(ids):
                fill = longest - len(seq)
                ids[k] = [pad_id] * fill + seq if left else seq + [pad_id] * fill
                masks[k] = [0] * fill + masks[k] if left else masks[k] + [0] * fill
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": masks}
        if any(len(seq) != len(ids[0]) for seq in ids):
            raise ProcessorError(
                f"padding=False gave prompts of lengths {[len(s) for s in ids]}, which cannot form one tensor",
                hint="pass padding=True, or return_tensors=None for lists",
            )
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(masks, dtype=torch.long),
        }

    def _pixels(self, nested: list[list[Any]], costs: list[list[ImageCost]], clips: list | None = None,
                texts: list[str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        encoded = [
            [
                encode_image(
                    to_rgb(img, f"image {j} of sample {i}", convert=self.settings.do_convert_rgb), cost, self.settings
                )
                for j, (img, cost) in enumerate(zip(imgs, row))
            ]
            for i, (imgs, row) in enumerate(zip(nested, costs))
        ]
        if clips and any(clips):
            convert = self.settings.do_convert_rgb
            encoded = [
                merge_media(media_order(text, self.image_token, self.video_token), images,
                            [encode_video(v, self.settings, convert=convert) for v in row])
                for text, images, row in zip(texts or [None] * len(encoded), encoded, clips)
            ]  # fmt: skip
        values, mask = pad_batch(encoded)
        return {"pixel_values": values, "pixel_attention_mask": mask}

    # ---------------------------------------------------------------- chat and decoding

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        *,
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str | list[str]:
        """Render one conversation (or a list of them) with the checkpoint's chat template.

        String contents are turned into ``[{"type": "text", "text": ...}]``; image items
        (``{"type": "image"}``) become the ``<image>`` placeholder, video items
        (``{"type": "video", "path": ...}``) the ``<video>`` one; a conversation with a video is
        rendered with the family's video template when it has one (as transformers does).
        """
        batch = bool(messages) and not isinstance(messages[0], Mapping)
        conversations = messages if batch else [messages]
        template = video_template(self, conversations)
        if template is None:
            raise ProcessorError(
                f"the checkpoint has no chat template (no chat_template.jinja, chat_template.json or "
                f"tokenizer_config.json chat_template in {os.path.dirname(self.tokenizer.source)})",
                hint="write the prompt yourself, with one image placeholder per image",
            )
        roles = {k: v for k, v in self.tokenizer.roles.items() if v is not None}
        rendered = [
            template.render(normalize_messages(c), add_generation_prompt=add_generation_prompt, **{**roles, **variables})
            for c in conversations
        ]
        check_rendered_videos(self, template, conversations, rendered)
        return rendered if batch else rendered[0]

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids."""
        if isinstance(ids, torch.Tensor) and ids.ndim != 1:
            raise ProcessorError(
                f"decode takes one sequence; got a tensor of shape {tuple(ids.shape)}",
                hint="use batch_decode for (B, L) tensors",
            )
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, *, skip_special_tokens: bool = False
    ) -> list[str]:
        """Texts of a batch of id sequences (a ``(B, L)`` tensor or a list of lists)."""
        return [self.tokenizer.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]
