"""Videos in prompts: matching ``<video>`` placeholders to videos, expanding them, and ordering
the frames among the images' tiles.

The family's :class:`~vlmkit.family.VideoLayout` decides the text of a video; this module only
places it. Every frame is one tile of ``pixel_values``, in prompt order with the images' tiles,
so the model reads videos exactly as it reads images.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ProcessorError
from ..family import VideoLayout
from .image import ImageCost, ImageSettings, encode_image, plan_image, to_rgb
from .video import Video, VideoPlan, check_sampling_options, open_video, plan_video, read_frames

__all__ = [
    "PlannedVideo", "as_nested_videos", "check_video_budget", "encode_video", "expand_videos", "media_order",
    "merge_media", "plan_videos",
]  # fmt: skip


@dataclass(frozen=True)
class PlannedVideo:
    """One video of a prompt: where it is read from (``source``), its :class:`VideoPlan` and
    the per-frame image plan (one unsplit tile)."""

    source: Any
    plan: VideoPlan
    frame_cost: ImageCost

    @property
    def visual_tokens(self) -> int:
        return self.plan.n_frames * self.frame_cost.visual_tokens


def _is_video(item: Any) -> bool:
    return isinstance(item, (Video, str, os.PathLike))


def as_nested_videos(videos: Any, texts: list[str] | None, token: str | None) -> list[list[Any]]:
    """One list of videos per prompt, checked against each prompt's ``token`` count."""
    n_prompts = 1 if texts is None else len(texts)
    counts = [0] * n_prompts if texts is None or token is None else [t.count(token) for t in texts]
    if videos is None:
        if any(counts):
            raise ProcessorError(
                f"the prompt holds {sum(counts)} {token} placeholder(s) but no video was passed",
                hint="pass videos=[...] (one per placeholder), or remove the placeholder from the text",
            )
        return [[] for _ in range(n_prompts)]
    if token is None:
        raise ProcessorError("this checkpoint takes no video (its preprocessor_config.json has no video_sampling)",
                             hint="use a checkpoint whose preprocessor_config.json has video_sampling, or pass the frames as images")  # fmt: skip
    if _is_video(videos):
        videos = [videos]
    if not isinstance(videos, Sequence):
        raise ProcessorError(f"videos is a {type(videos).__name__}; expected a list of video paths / Video objects")
    videos = list(videos)
    nested = [list(v) for v in videos] if videos and all(isinstance(v, (list, tuple)) for v in videos) else None
    if nested is None and texts is not None and len(texts) > 1:
        nested, start = [], 0
        for n in counts:
            nested.append(videos[start : start + n])
            start += n
    nested = nested if nested is not None else [videos]
    _check_counts(nested, counts if texts is not None else None, token)
    return nested


def _check_counts(nested: list[list[Any]], counts: list[int] | None, token: str) -> None:
    given = [len(v) for v in nested]
    if counts is not None and given != counts:
        per = ", ".join(f"sample {i}: {n} placeholder(s), {g} video(s)" for i, (n, g) in enumerate(zip(counts, given)))
        raise ProcessorError(
            f"the videos do not match the {token} placeholders ({per})",
            hint=f"write one {token} per video in the text (apply_chat_template writes it for each "
            "{'type': 'video'} part), or drop the extra video",
        )


def plan_videos(
    nested: list[list[Any]], layout: VideoLayout | None, settings: ImageSettings, image_seq_len: int,
    *, fps: Any = None, max_frames: Any = None,
) -> list[list[PlannedVideo]]:  # fmt: skip
    """Open every video (headers only) and choose its frames; raises before any frame is decoded."""
    fps, max_frames = check_sampling_options(fps, max_frames)
    if not any(nested):
        return [[] for _ in nested]
    out = []
    for i, row in enumerate(nested):
        planned = []
        for j, item in enumerate(row):
            source = open_video(item, f"video {j} of sample {i}")
            plan = plan_video(source, layout.sampling, fps=fps, max_frames=max_frames)
            cost = plan_image(source.size, settings, image_seq_len, split=False, longest_edge=layout.sampling.longest_edge)
            planned.append(PlannedVideo(source, plan, cost))
        out.append(planned)
    return out


def expand_videos(prompt: str, videos: list[PlannedVideo], layout: VideoLayout | None, image_seq_len: int) -> str:
    """Replace the i-th video placeholder of ``prompt`` with the family's text for ``videos[i]``."""
    if layout is None or not videos:
        return prompt
    parts = prompt.split(layout.video)
    pieces = [parts[0]]
    for video, rest in zip(videos, parts[1:]):
        pieces += [layout.expand(video.plan, image_seq_len), rest]
    return "".join(pieces)


def media_order(prompt: str | None, image_token: str, video_token: str | None) -> list[str]:
    """``"image"`` / ``"video"`` for each placeholder of ``prompt``, in order."""
    if prompt is None or video_token is None:
        return []
    pattern = "|".join(re.escape(t) for t in (image_token, video_token))
    return ["image" if m.group(0) == image_token else "video" for m in re.finditer(pattern, prompt)]


def encode_video(video: PlannedVideo, settings: ImageSettings, *, convert: bool) -> torch.Tensor:
    """Decode the planned frames and encode each as one tile: float32 ``(n_frames, 3, tile, tile)``."""
    frames = read_frames(video.source, video.plan)
    where = video.plan.name
    tiles = [encode_image(to_rgb(f, f"a frame of {where}", convert=convert), video.frame_cost, settings) for f in frames]
    return torch.cat(tiles)


def check_video_budget(videos: list[list[PlannedVideo]], limit: int | None) -> None:
    """Refuse a video costing more than ``limit`` visual tokens, saying which ``max_frames`` fits."""
    for i, row in enumerate(videos):
        for j, video in enumerate(row):
            if limit is not None and video.visual_tokens > limit:
                per = video.frame_cost.visual_tokens
                raise ProcessorError(
                    f"video {j} of sample {i} ({video.plan.name}) costs {video.visual_tokens} visual tokens "
                    f"({video.plan.n_frames} frames x {per}), over max_visual_tokens={limit}",
                    hint=f"pass max_frames={limit // per} (or fewer)" if limit >= per
                    else f"one frame costs {per} tokens: raise max_visual_tokens to at least that",
                )


def merge_media(order: list[str], images: list[torch.Tensor], videos: list[torch.Tensor]) -> list[torch.Tensor]:
    """One sample's tile stacks in prompt ``order`` (images, then videos, without a prompt)."""
    if not order:
        return [*images, *videos]
    image_iter, video_iter = iter(images), iter(videos)
    return [next(image_iter) if kind == "image" else next(video_iter) for kind in order]


def _video_parts(conversation: Sequence[Any]) -> int:
    from .video import videos_in_messages

    return len(videos_in_messages(conversation))


def video_template(processor: Any, conversations: Sequence[Sequence[Any]]) -> Any:
    """The chat template for ``conversations``: the family's video template when one of them has
    a video part (refused when the checkpoint takes no video), else the checkpoint's (or ``None``)."""
    if not any(_video_parts(c) for c in conversations):
        return processor.template
    layout = processor.video
    if layout is None:
        raise ProcessorError("a message has a video part but this checkpoint takes no video "
                             "(its preprocessor_config.json has no video_sampling)",
                             hint="use a checkpoint whose preprocessor_config.json has video_sampling, or pass the frames as images")  # fmt: skip
    if layout.chat_template is None:
        return processor.template
    return _compiled(layout.chat_template)


@functools.lru_cache(maxsize=8)
def _compiled(text: str) -> Any:
    from .text import ChatTemplate

    return ChatTemplate(text, origin="the model family's video chat template")


def check_rendered_videos(processor: Any, template: Any, conversations: Sequence[Sequence[Any]], rendered: list[str]) -> None:
    """Refuse a rendering that lost (or invented) video placeholders: the template has no video part."""
    token = processor.video_token
    for k, (conversation, text) in enumerate(zip(conversations, rendered)):
        parts, written = _video_parts(conversation), (text.count(token) if token else 0)
        if parts != written:
            raise ProcessorError(
                f"conversation {k} has {parts} video part(s) but the chat template ({template.origin}) wrote "
                f"{written} {token} placeholder(s): the template has no place for videos",
                hint=f"use a template that writes {token} for {{'type': 'video'}} parts, or write the prompt yourself",
            )
