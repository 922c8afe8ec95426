"""The :class:`Processor`: prompts and images in, model inputs out.

``processor(text=..., images=...)`` returns ``input_ids`` ``(B, L)``, ``attention_mask``
``(B, L)``, ``pixel_values`` ``(B, N, 3, H, W)`` and ``pixel_attention_mask`` ``(B, N, H, W)``
laid out as the checkpoint's transformers processor does (the prompt layout is the family's; a
family with its own image processing, :meth:`vlmkit.family.Family.image_processing`, plans and
encodes each image; transformers' flat ``(N_total, 3, H, W)`` is each prompt's real images concatenated). The token cost of every image is worked
out from its size before any pixel is touched, so :meth:`Processor.image_cost`,
:meth:`Processor.prompt_cost` and the ``max_visual_tokens`` guard are cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import ProcessorError
from .call_plan import CallPlan, check_image_keywords, plan_call
from .chat import chat_images, refuse_untokenized, render_conversations, split_chat_keywords, template_from_text
from .checks import CheckedSpec
from .image import ImageCost, ImageSettings, check_format, encode_image, image_size, pad_batch, plan_image, to_rgb
from .inputs import as_nested_images, as_texts, check_limit, check_placeholder_counts
from .loading import load_processor
from .options import resolve_call_options
from .outputs import ProcessorOutput, PromptCost
from .text import ChatTemplate, TextTokenizer
from .tile_checks import check_grid, over_budget
from .tokens import check_image_tokens, encode_texts, pad_texts
from .video import videos_in_messages
from .video_prompt import (
    as_nested_videos, check_rendered_videos, check_video_budget, encode_video, expand_videos, media_order,
    merge_media, plan_videos, video_template,
)  # fmt: skip

__all__ = ["Processor", "ProcessorOutput", "PromptCost", "load_processor"]


class Processor:
    """Turns prompts and images into model inputs. Build with :func:`load_processor`.

    Takes transformers' processor, image-processor and ``apply_chat_template`` keywords (flat or
    nested in ``text_kwargs`` / ``images_kwargs`` / ``common_kwargs``); each either gives
    transformers' result or raises a :class:`ProcessorError` saying why (the table is
    :data:`vlmkit.processor.options.CALL_KEYWORDS`). Deliberate differences from transformers:

    ==========================================  ==========================  =========================
    what                                        vlmkit                      transformers
    ==========================================  ==========================  =========================
    message ``content`` given as a string       rendered as one text item   rendered as nothing
    ``padding`` default (a batch of prompts)    ``True`` (pad to longest)   ``False``
    ``return_tensors`` default                  ``'pt'``                    ``None`` (lists)
    ``add_generation_prompt`` default           ``True`` (``False`` with    ``False``
                                                ``continue_final_message``)
    a flat image list with several prompts      shared out by each          the same in transformers
                                                prompt's ``<image>`` count  5; a count mismatch is
                                                (a mismatch is an error)    an error after the split
    a keyword that changes nothing              an error naming it          ignored with a warning
    ==========================================  ==========================  =========================
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        settings: ImageSettings,
        spec: CheckedSpec,
        *,
        chat_template: ChatTemplate | None = None,
        max_visual_tokens: int | None = None,
        video_layout: Any = None,
        image_processing: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.spec = spec
        self.template = chat_template
        self.max_visual_tokens = check_limit(max_visual_tokens)
        self.video = video_layout  # the family's VideoLayout, or None: the checkpoint takes no video
        self.image_processing = image_processing  # the family's ImageProcessing, or None: the tiled default

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
    def input_size(self) -> tuple[int, int]:
        """``(height, width)`` of the pixels the vision tower receives per tile (tiled side: the tile
        square; a family's own image side: its nominal input). Compare it with the tower's image size."""
        side = self.image_processing
        return (self.settings.tile,) * 2 if side is None else tuple(side.input_size)

    @property
    def image_splitting(self) -> bool | None:
        """Whether images are cut into tiles by default (``do_image_splitting``); ``None``: this
        image side never splits and takes no ``do_image_splitting`` keyword."""
        return self.settings.do_image_splitting if self.image_processing is None else None

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
        if self.image_processing is not None:
            return f"Processor(image_seq_len={self.image_seq_len}, image_processing={s!r}, tokenizer={self.tokenizer!r})"
        return (
            f"Processor(image_seq_len={self.image_seq_len}, tile={s.tile}, longest_edge={s.longest_edge}, "
            f"do_image_splitting={s.do_image_splitting}, tokenizer={self.tokenizer!r})"
        )

    # ---------------------------------------------------------------- cost preflight

    def image_cost(self, image_or_size: Any, **options: Any) -> ImageCost:
        """Token cost of one image, from a PIL image / array or a ``(height, width)`` tuple. No pixel work.

        ``options`` are the image keywords of a call (``do_image_splitting``, ``longest_edge``,
        ``size``, ...); ``.patches`` gives transformers' ``get_number_of_image_patches`` answer.
        """
        if isinstance(image_or_size, tuple) and len(image_or_size) == 2:
            size = tuple(int(v) for v in image_or_size)
            if min(size) <= 0:
                raise ProcessorError(f"image size {image_or_size} (height, width) is empty", hint="sizes must be >= 1")
        else:
            size = image_size(image_or_size, "the image")
            check_format(image_or_size, "the image")
        plan = self._call_plan(options)
        cost = self._cost(size, plan)
        check_grid(self.spec.layout, cost, "the image", plan, self.image_seq_len)
        return cost

    def _cost(self, size: tuple[int, int], plan: CallPlan) -> ImageCost:
        """One image's plan: the family's image processing, or the tiled default."""
        if self.image_processing is not None:
            return self.image_processing.plan(size, plan.settings)
        return plan_image(size, plan.settings, self.image_seq_len, split=plan.split, longest_edge=plan.longest_edge)

    def get_number_of_image_patches(
        self, height: int, width: int, images_kwargs: Mapping[str, Any] | None = None
    ) -> tuple[int, int, int]:
        """transformers' ``(num_patches, num_rows, num_cols)``: ``(0, 0, 0)`` for an image that is one tile."""
        return self.image_cost((height, width), **dict(images_kwargs or {})).patches

    def prompt_cost(self, text: str | Sequence[str], images: Any = None, *, videos: Any = None, fps: float | None = None,
                    max_frames: int | None = None, **options: Any) -> PromptCost | list[PromptCost]:  # fmt: skip
        """Token count of a prompt (or a list of prompts) with its images and videos, without any
        pixel work (videos: headers only, no frame decoded)."""
        texts, nested = self._layout_inputs(text, images)
        plan = self._call_plan(options)
        costs = self._plan(nested, plan, limit=None)
        clips = self._videos(texts, videos, fps, max_frames, limit=None)
        out = []
        for prompt, image_costs, row in zip(texts, costs, clips):
            total = len(self.tokenizer.encode(self._expand(prompt, image_costs, row)))
            visual = sum(c.visual_tokens for c in image_costs) + sum(v.visual_tokens for v in row)
            out.append(PromptCost(total, total - visual, visual, tuple(image_costs), tuple(v.plan for v in row)))
        return out[0] if isinstance(text, str) else out

    # ---------------------------------------------------------------- main call

    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, *, videos: Any = None,
                 fps: float | None = None, max_frames: int | None = None, **options: Any) -> ProcessorOutput:  # fmt: skip
        """Tokenize ``text`` with its ``images`` expanded; encode the images.

        ``images`` is an image, a flat list (shared out over the prompts by their ``<image>``
        counts) or one list per prompt. Returns ``input_ids``/``attention_mask`` ``(B, L)`` and
        ``pixel_values`` float32 ``(B, N, 3, H, W)``/``pixel_attention_mask`` int64
        ``(B, N, H, W)``; ``return_tensors=None`` gives lists for the text fields. ``options``
        are transformers' processor keywords, flat or nested (``text_kwargs``, ``images_kwargs``,
        ``common_kwargs``): see :mod:`vlmkit.processor.options` and :data:`DIFFERENCES`.

        ``videos`` (video file paths or :class:`~vlmkit.processor.video.Video` objects, one per
        ``<video>`` placeholder) are sampled at ``fps`` frames per second, at most ``max_frames``
        (default: the checkpoint's); each frame is one tile of ``pixel_values``, in prompt order.
        """
        return self._process(text, images, videos, fps, max_frames, options, pixels=True)

    def tokenize(self, text: str | Sequence[str], images: Any = None, *, videos: Any = None, fps: float | None = None,
                 max_frames: int | None = None, **options: Any) -> ProcessorOutput:  # fmt: skip
        """The text fields of ``self(text, images, ...)`` (``input_ids``, ``attention_mask`` ``(B, L)``,
        ...) with no pixel work: images are only measured, as :meth:`prompt_cost` does. For a
        caller that already holds the pixels of some images (e.g. a chat's earlier turns)."""
        return self._process(text, images, videos, fps, max_frames, options, pixels=False)

    def _process(self, text: Any, images: Any, videos: Any, fps: Any, max_frames: Any, options: Mapping[str, Any], *,
                 pixels: bool) -> ProcessorOutput:  # fmt: skip
        plan = self._call_plan(options)
        texts, nested = self._layout_inputs(text, images)
        costs = self._plan(nested, plan, limit=plan.max_visual_tokens)  # raises before any pixel work
        clips = self._videos(texts, videos, fps, max_frames, limit=plan.max_visual_tokens)  # headers only
        if plan.tokens.truncation and any(clips):
            raise ProcessorError("truncation with videos is not supported: it could cut a video's frame tokens",
                                 hint="drop truncation=, or pass fewer frames (max_frames=)")  # fmt: skip
        out = ProcessorOutput()
        if texts is not None:
            expanded = [self._expand(t, c, v) for t, c, v in zip(texts, costs, clips)]
            encodings = encode_texts(self.tokenizer, expanded, plan.tokens)
            ids = [enc.ids for enc in encodings]
            spans = None
            if plan.tokens.truncation or plan.tokens.return_mm_token_type_ids:
                spans = [[self.tokenizer.encode(self.spec.layout.expand(c, self.image_seq_len), add_special_tokens=False)
                          for c in row] for row in costs]  # fmt: skip
            if plan.tokens.truncation:
                check_image_tokens(ids, spans, self.image_token_id, plan.tokens)
            special, offsets = [e.special_tokens_mask for e in encodings], [e.offsets for e in encodings]
            out.update(pad_texts(ids, self.tokenizer, self.pad_token_id, plan.tokens, plan.return_tensors, spans,
                                 special, offsets))  # fmt: skip
        if pixels and (any(nested) or any(clips)):
            out.update(self._pixels(nested, costs, plan, clips, texts))
        return out if plan.device is None else out.to(plan.device)

    def _videos(self, texts: list[str] | None, videos: Any, fps: Any, max_frames: Any, *, limit: int | None) -> list:
        """Each prompt's videos, opened and sampled (headers only; see :mod:`.video_prompt`)."""
        nested = as_nested_videos(videos, texts, self.video_token)
        clips = plan_videos(nested, self.video, self.settings, self.image_seq_len, fps=fps, max_frames=max_frames)
        check_video_budget(clips, limit)
        return clips

    def check_options(self, **options: Any) -> None:
        """Check call keywords now (e.g. options stored for later calls); raises :class:`ProcessorError`."""
        self._call_plan(options)

    def _call_plan(self, options: Mapping[str, Any]) -> CallPlan:
        limit, side = self.max_visual_tokens, self.image_processing
        if side is not None:
            check_image_keywords(options, side.keywords)
        return plan_call(resolve_call_options(options), self.settings, image_seq_len=self.image_seq_len,
                         padding_side=self.tokenizer.padding_side, max_visual_tokens=limit,
                         image_processing=side)  # fmt: skip

    def _layout_inputs(self, text: Any, images: Any) -> tuple[list[str] | None, list[list[Any]]]:
        """Normalize to a list of prompts and one list of images per prompt; check the counts."""
        if text is None and images is None:
            raise ProcessorError("nothing to process: pass text=, images= or both (videos= go with a text= prompt)")
        texts = as_texts(text)
        nested = as_nested_images(images, texts, self.image_token)
        if texts is None:
            return None, nested
        check_placeholder_counts(texts, nested, self.image_token)
        return texts, nested

    def _plan(self, nested: list[list[Any]], plan: CallPlan, *, limit: int | None) -> list[list[ImageCost]]:
        """Each image's plan, checking type, size, mode, tile tokens and the token budget."""
        plans = []
        for i, imgs in enumerate(nested):
            row = []
            for j, img in enumerate(imgs):
                where = f"image {j} of sample {i}"
                size = image_size(img, where)
                check_format(img, where)
                cost = self._cost(size, plan)
                check_grid(self.spec.layout, cost, where, plan, self.image_seq_len)
                if limit is not None and cost.visual_tokens > limit:
                    msg, fix = over_budget(where, cost, limit, plan, self.image_seq_len, tiled=self.image_processing is None)
                    raise ProcessorError(msg, hint=fix)
                row.append(cost)
            plans.append(row)
        return plans

    def _expand(self, prompt: str, costs: list[ImageCost], videos: Sequence[Any] = ()) -> str:
        """Replace the i-th image placeholder in ``prompt`` with the token layout of ``costs[i]``,
        then the video placeholders with the family's text for ``videos``."""
        parts = prompt.split(self.image_token)
        pieces = [parts[0]]
        for cost, rest in zip(costs, parts[1:]):
            pieces.append(self.spec.layout.expand(cost, self.image_seq_len))
            pieces.append(rest)
        return expand_videos("".join(pieces), list(videos), self.video, self.image_seq_len)

    def _encode(self, image: Any, cost: ImageCost, plan: CallPlan, where: str) -> torch.Tensor:
        """One image -> float32 ``(n_tiles, 3, H, W)``: the family's image processing, or the tiled default."""
        settings = plan.settings
        if self.image_processing is not None:
            return self.image_processing.encode(image, cost, settings, where)
        return encode_image(to_rgb(image, where, convert=settings.do_convert_rgb), cost, settings)

    def _pixels(self, nested: list[list[Any]], costs: list[list[ImageCost]], plan: CallPlan, clips: list,
                texts: list[str] | None) -> dict[str, Any]:  # fmt: skip
        """Each prompt's image tiles, and video frames in prompt order, padded into one batch."""
        encoded = [
            [self._encode(img, cost, plan, f"image {j} of sample {i}") for j, (img, cost) in enumerate(zip(imgs, row))]
            for i, (imgs, row) in enumerate(zip(nested, costs))
        ]
        if any(clips):
            convert = self.settings.do_convert_rgb
            encoded = [
                merge_media(media_order(text, self.image_token, self.video_token), images,
                            [encode_video(v, self.settings, convert=convert) for v in row])
                for text, images, row in zip(texts or [None] * len(encoded), encoded, clips)
            ]  # fmt: skip
        values, mask = pad_batch(encoded)
        if plan.return_tensors == "np":
            return {"pixel_values": values.numpy(), "pixel_attention_mask": mask.numpy()}
        return {"pixel_values": values, "pixel_attention_mask": mask}

    # ---------------------------------------------------------------- chat and decoding

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool | str = False,
        tokenize: bool = False,
        return_dict: bool = False,
        processor_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render one conversation (or a list of them) with the checkpoint's chat template, or ``chat_template``.

        String contents are turned into ``[{"type": "text", "text": ...}]``; image items
        (``{"type": "image"}``) become the ``<image>`` placeholder, video items
        (``{"type": "video", "path": ...}``) the ``<video>`` one (a conversation with a video is
        rendered with the family's video template when it has one, as transformers does). ``add_generation_prompt``
        defaults to True (False with ``continue_final_message``). Keywords the template reads
        (``tools``, ``documents``, custom variables) are template variables; the others are
        processor keywords, used with ``tokenize=True``: then the prompts (with the images of
        ``{"type": "image", "image": img}`` items, or ``images=``) go through ``self(...)``, which
        returns ``input_ids`` ``(B, L)`` (or the whole output with ``return_dict=True``).
        """
        batch = bool(messages) and not isinstance(messages[0], Mapping)
        conversations = messages if batch else [messages]
        template = self._template_for(chat_template, conversations)
        variables, call_kwargs = split_chat_keywords(template, kwargs)
        roles = {k: v for k, v in self.tokenizer.roles.items() if v is not None}
        add = not continue_final_message if add_generation_prompt is None else add_generation_prompt
        rendered = render_conversations(template, conversations, add_generation_prompt=add,
                                        continue_final_message=continue_final_message,
                                        variables={**roles, **variables})  # fmt: skip
        check_rendered_videos(self, template, conversations, rendered)
        if processor_kwargs is not None and not isinstance(processor_kwargs, Mapping):
            kind = type(processor_kwargs).__name__
            raise ProcessorError(f"processor_kwargs must be a dict of processor keywords, got a {kind}")
        call_kwargs = {**call_kwargs, **dict(processor_kwargs or {})}
        if not tokenize:
            refuse_untokenized(template, call_kwargs, return_dict)
            return rendered if batch else rendered[0]
        return self._tokenize_chat(rendered, conversations, call_kwargs, return_dict)

    def _template_for(self, chat_template: str | None, conversations: Any) -> ChatTemplate:
        if chat_template is not None:
            return template_from_text(chat_template)
        template = video_template(self, conversations)
        if template is None:
            raise ProcessorError(
                f"the checkpoint has no chat template (no chat_template.jinja, chat_template.json or "
                f"tokenizer_config.json chat_template in {os.path.dirname(self.tokenizer.source)})",
                hint="write the prompt yourself, with one image placeholder per image, or pass chat_template=",
            )
        return template

    def _tokenize_chat(self, prompts: list[str], conversations: Any, call_kwargs: dict[str, Any], return_dict: bool):
        images = call_kwargs.pop("images", None)
        carried = chat_images(conversations)
        if images is not None and any(carried):
            raise ProcessorError("images were given both in the messages and as images=", hint="pass them one way")
        images = images if images is not None else (carried if any(carried) else None)
        carried_videos = [videos_in_messages(c) for c in conversations]
        if call_kwargs.get("videos") is None and any(carried_videos):
            call_kwargs["videos"] = carried_videos  # one list per prompt, as the images
        bos = self.tokenizer.roles.get("bos_token")
        if bos is not None and prompts[0].startswith(bos):
            call_kwargs.setdefault("add_special_tokens", False)  # the template wrote it already (as transformers)
        out = self(text=prompts, images=images, **call_kwargs)
        return out if return_dict else out["input_ids"]

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
