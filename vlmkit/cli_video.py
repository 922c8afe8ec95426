"""``vlmkit generate SOURCE --video clip.mp4 -p "What happens?"`` (``--fps``, ``--max-frames``).

Before any compute the preflight prints, per video, its frames and their token cost
(``frames x tokens per frame``), from the file's header alone; a prompt that cannot fit the
model's context with ``--max-new-tokens`` more is refused with the ``--max-frames`` / ``--fps``
that would fit.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Any

from .errors import ProcessorError, VlmkitError
from .processor.video import check_sampling_options

__all__ = ["check_video_flags", "video_batch"]


def check_video_flags(video: list[Path] | None, fps: float | None, max_frames: int | None, batch: bool) -> None:
    """Refuse, before the model loads, flags that cannot apply: bad values, --fps / --max-frames
    without --video, --video with --batch, a missing file."""
    try:
        check_sampling_options(fps, max_frames)
    except ProcessorError as exc:
        raise VlmkitError(exc.message.replace("fps", "--fps").replace("max_frames", "--max-frames"),
                          hint="e.g. --fps 1 --max-frames 16") from None  # fmt: skip
    if not video and (fps is not None or max_frames is not None):
        raise VlmkitError("--fps and --max-frames only apply with --video", hint="add --video clip.mp4, or drop them")
    if video and batch:
        raise VlmkitError("--video does not apply with --batch", hint="answer about one video at a time with -p")
    for path in video or []:
        if not path.is_file():
            raise ProcessorError(f"no video file {str(path)!r}",
                                 hint="check the path; for a folder of frames make a file first: "
                                 "ffmpeg -framerate 30 -i frames/%03d.png clip.mp4")  # fmt: skip


def _describe(k: int, plan: Any, per_frame: int) -> str:
    height, width = plan.size
    return (f"video {k} {plan.name.removeprefix('video ')} ({width}x{height}, {plan.total_frames} frames at "
            f"{plan.video_fps:g} fps, {plan.duration:.1f} s): {plan.n_frames} frames x {per_frame} tokens = "
            f"{plan.n_frames * per_frame} visual tokens")  # fmt: skip


def _fitting_max_frames(cost_of, frames: int, budget: int) -> int | None:
    """The largest ``max_frames`` below ``frames`` whose prompt fits ``budget`` tokens (bisection)."""
    low, high = 0, frames - 1  # low always fits (0: nothing fits yet), high is the candidate
    while low < high:
        mid = (low + high + 1) // 2
        if cost_of(mid).total_tokens <= budget:
            low = mid
        else:
            high = mid - 1
    return low or None


def _refuse(cost, costs_of, context: int, max_new_tokens: int, tokens_per_frame: int) -> None:
    budget = context - max_new_tokens
    frames = max(p.n_frames for p in cost.videos)
    fit = _fitting_max_frames(costs_of, frames, budget) if frames > 1 else None
    duration = max(p.duration for p in cost.videos)
    if fit is not None:
        rate = max(math.floor(fit / duration * 1000) / 1000, 0.001)  # round(rate * duration) <= fit frames
        hint = f"pass --max-frames {fit} (or --fps {rate:g}), or fewer --max-new-tokens"
    else:
        hint = "even one frame per video does not fit: shorten the text, use fewer videos or fewer --max-new-tokens"
    raise VlmkitError(
        f"the prompt is {cost.total_tokens} tokens ({cost.visual_tokens} visual: {frames} frames x "
        f"{tokens_per_frame} tokens per frame) + --max-new-tokens {max_new_tokens} = "
        f"{cost.total_tokens + max_new_tokens}, over the model's context of {context} tokens (max_position_embeddings)",
        hint=hint,
    )


def video_batch(err, model, processor, prompt: str, images: list, videos: list[Path],
                fps: float | None, max_frames: int | None, max_new_tokens: int, kwargs: dict) -> Any:  # noqa: ANN001  # fmt: skip
    """Model inputs for one user turn with images and videos, after the token-cost preflight."""
    from .generation import context_length

    if not hasattr(processor, "video_token") or processor.video_token is None:
        raise ProcessorError("this checkpoint takes no video (the checkpoint's preprocessor_config.json has no video_sampling)",
                             hint="use a checkpoint whose preprocessor_config.json has video_sampling")  # fmt: skip
    content = [{"type": "image"} for _ in images] + [{"type": "video", "path": str(v)} for v in videos]
    text = processor.apply_chat_template([{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}],
                                         add_generation_prompt=True)  # fmt: skip
    items = [str(v) for v in videos]

    def cost_of(frames: int | None):
        return processor.prompt_cost(text, images or None, videos=items, fps=fps, max_frames=frames, **kwargs)

    cost = cost_of(max_frames)
    for k, plan in enumerate(cost.videos, start=1):
        err.print(_describe(k, plan, processor.image_seq_len), markup=False)
    err.print(f"prompt: {cost.total_tokens} tokens ({cost.visual_tokens} visual)", markup=False)
    context = context_length(model.backbone)
    if context is not None and cost.total_tokens + max_new_tokens > context:
        _refuse(cost, cost_of, context, max_new_tokens, processor.image_seq_len)
    return processor(text=text, images=images or None, videos=items, fps=fps, max_frames=max_frames, **kwargs)
