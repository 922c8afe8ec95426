"""How the SmolVLM2 (``smolvlm`` family) writes a video into the prompt (building blocks of the
``idefics3`` family; this module is no plugin).

A ``<video>`` placeholder of a video sampled to frames ``f_1 .. f_n`` (timestamps ``t_i`` in
seconds, ``d`` seconds long) becomes::

    You are provided the following series of {n in words} frames from a {H:MM:SS of d} [H:MM:SS] video.\\n
    \\nFrame from {MM:SS of t_1}:<fake_token_around_image><global-img><image>*seq_len<fake_token_around_image>
    ... one line per frame ...
    \\n\\n

Every frame is one unsplit tile. The sampling (``video_sampling`` in preprocessor_config.json:
``fps``, ``max_frames``, ``video_size``) is the checkpoint's; as in transformers, ``size`` replaces
``video_size`` when preprocessor_config.json has both (the published files do: 2048, then the
frame is squeezed to the 512-px tile). A conversation with a video part is rendered with the
reference processor's video chat template, whatever the checkpoint ships (as transformers does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import ProcessorError, SpecError
from ..processor.video import VideoPlan, VideoSampling
from .idefics3_layout import ImageTokenLayout

__all__ = ["VIDEO_CHAT_TEMPLATE", "VIDEO_TOKEN", "FrameTimestampLayout", "number_words", "video_layout", "video_sampling"]

VIDEO_TOKEN = "<video>"
_INTRO = "You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
_FRAME = "\nFrame from {minutes:02d}:{seconds:02d}:"
_OUTRO = "\n\n"

#: The reference processor's template for conversations with videos (its ``DEFAULT_CHAT_TEMPLATE``).
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}"
    "{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}"
    "{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()  # fmt: skip
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if rest < 20:
        tail = _ONES[rest]
    else:
        tail = _TENS[rest // 10] + (f"-{_ONES[rest % 10]}" if rest % 10 else "")
    if not hundreds:
        return tail
    return f"{_ONES[hundreds]} hundred" + (f" and {tail}" if rest else "")


def number_words(n: int) -> str:
    """``n`` (0 <= n < 1,000,000) in English words, as the reference's ``num2words`` writes it."""
    if not 0 <= n < 1_000_000:
        raise ProcessorError(f"{n} frames cannot be written in the video prompt", hint="pass max_frames below 1000000")
    thousands, rest = divmod(n, 1000)
    if not thousands:
        return _below_thousand(rest)
    head = f"{_below_thousand(thousands)} thousand"
    if not rest:
        return head
    return head + (f", {_below_thousand(rest)}" if rest >= 100 else f" and {_below_thousand(rest)}")


@dataclass(frozen=True)
class FrameTimestampLayout:
    """The video prompt layout (a :class:`vlmkit.family.VideoLayout`): the ``<video>``
    placeholder, the checkpoint's sampling, and each frame as one unsplit image with its time."""

    video: str
    image: ImageTokenLayout
    sampling: VideoSampling
    chat_template: str = VIDEO_CHAT_TEMPLATE

    def expand(self, plan: VideoPlan, image_seq_len: int) -> str:
        """The text that replaces one ``<video>`` placeholder for the frames of ``plan``."""
        frame = f"{self.image.fake}{self.image.global_image}{self.image.image * image_seq_len}{self.image.fake}"
        duration = timedelta(seconds=int(plan.duration))
        parts = [_INTRO.format(count=number_words(plan.n_frames), duration=str(duration))]
        for t in plan.timestamps:
            parts.append(_FRAME.format(minutes=int(t // 60), seconds=int(t % 60)) + frame)
        parts.append(_OUTRO)
        return "".join(parts)


def _edge(value: Any, key: str, source: str) -> int:
    edge = value.get("longest_edge") if isinstance(value, Mapping) else None
    if isinstance(edge, bool) or not isinstance(edge, int) or edge <= 0:
        raise SpecError(f"expected {{'longest_edge': <positive int>}}, got {value!r}", key_path=key, source=source)
    return edge


def video_sampling(config: Mapping[str, Any], source: str) -> VideoSampling | None:
    """The checkpoint's :class:`VideoSampling` from preprocessor_config.json ``video_sampling``
    (``None`` when it has none: the checkpoint takes no video)."""
    block = config.get("video_sampling")
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise SpecError(f"expected a mapping, got {block!r:.60}", key_path="video_sampling", source=source)
    fps, frames = block.get("fps"), block.get("max_frames")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
        raise SpecError(f"expected a number > 0, got {fps!r}", key_path="video_sampling.fps", source=source)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise SpecError(f"expected an integer >= 1, got {frames!r}", key_path="video_sampling.max_frames", source=source)
    if "size" in config:  # transformers' SmolVLMVideoProcessor: `size` replaces video_size when both are given
        edge = _edge(config["size"], "size", source)
    else:
        edge = _edge(block.get("video_size"), "video_sampling.video_size", source)
    return VideoSampling(fps=float(fps), max_frames=frames, longest_edge=edge)


def video_layout(tokenizer_config: Mapping[str, Any], image: ImageTokenLayout, sampling: VideoSampling) -> FrameTimestampLayout:
    """The layout; the placeholder is ``<video>`` unless tokenizer_config.json names a ``video_token``."""
    extra = tokenizer_config.get("extra_special_tokens")
    named = tokenizer_config.get("video_token") or (extra.get("video_token") if isinstance(extra, Mapping) else None)
    return FrameTimestampLayout(video=named if isinstance(named, str) and named else VIDEO_TOKEN, image=image, sampling=sampling)
