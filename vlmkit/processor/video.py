"""Video input of the processor: reading frames and choosing which ones the model sees.

A video is one of:

- a path to a video file, decoded with PyAV (``pip install 'vlmkit[video]'``; imported only
  when a file is read); its frame count and rate come from the container;
- a :class:`Video`: frames in memory (a ``(T, H, W, 3)`` uint8 array, or a list of PIL images /
  ``(H, W[, C])`` uint8 arrays) with their frame rate, or :meth:`Video.from_folder` for a folder
  of image files, one per frame, in name order.

:func:`plan_video` decides the frames from the header alone (no frame is decoded): the model
family's :class:`VideoSampling` (the checkpoint's ``fps``, ``max_frames``), overridable per call,
and :func:`sample_indices`. :func:`read_frames` then decodes only those frames.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ProcessorError
from ..limits import read_image_file
from .image import check_format, image_size

__all__ = [
    "FRAME_SUFFIXES",
    "Video",
    "VideoPlan",
    "VideoSampling",
    "check_sampling_options",
    "open_video",
    "plan_video",
    "read_frames",
    "sample_indices",
    "videos_in_messages",
]

#: Image files read from a folder of frames.
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_INSTALL = "pip install 'vlmkit[video]'"


@dataclass(frozen=True)
class VideoSampling:
    """How a checkpoint samples a video: ``fps`` frames per second of video, at most
    ``max_frames``; each frame resized so its longest edge is ``longest_edge`` (then squeezed to
    one tile); ``skip_secs`` seconds dropped at both ends of a video long enough to spare them."""

    fps: float
    max_frames: int
    longest_edge: int
    skip_secs: float = 1.0


def check_sampling_options(fps: Any, max_frames: Any) -> tuple[float | None, int | None]:
    """Validate per-call ``fps`` (> 0) and ``max_frames`` (>= 1); ``None`` keeps the checkpoint's."""
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not fps > 0
                            or not np.isfinite(fps)):  # fmt: skip
        raise ProcessorError(f"fps must be a number of frames per second > 0, got {fps!r}",
                             hint="e.g. fps=1 (one frame per second of video), or leave it out for the checkpoint's")  # fmt: skip
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer))
                                   or max_frames < 1):  # fmt: skip
        raise ProcessorError(f"max_frames must be an integer >= 1, got {max_frames!r}",
                             hint="e.g. max_frames=16, or leave it out for the checkpoint's")  # fmt: skip
    return (None if fps is None else float(fps)), (None if max_frames is None else int(max_frames))


def sample_indices(total: int, video_fps: float, *, fps: float, max_frames: int, skip_secs: float = 1.0) -> np.ndarray:
    """Indices of the frames to keep out of ``total`` frames shot at ``video_fps``.

    ``round(fps * duration)`` frames, capped at ``max_frames``, at least 1, spread evenly
    (``linspace``, truncated, duplicates dropped) over the video; when the video is longer than
    ``2 * skip_secs`` plus ``max_frames * fps`` seconds, ``skip_secs`` at each end are left out.
    The reference video processor's rule, step for step. Returns int64 ``(n,)``, increasing.
    """
    duration = total / video_fps
    wanted = max(1, min(int(round(fps * duration)), max_frames))
    start, end = 0, total - 1
    if skip_secs > 0 and duration - 2 * skip_secs > max_frames * fps:
        start, end = int(skip_secs * video_fps), int(total - skip_secs * video_fps)
    start, end = max(0, start), min(end, total - 1)
    if start >= end:
        start, end = 0, total - 1
    return np.unique(np.linspace(start, end, wanted, dtype=int))


# ----------------------------------------------------------------------------- sources


class Video:
    """Frames in memory (or in a folder) with their frame rate ``fps``, named ``name`` in errors.

    ``frames``: a ``(T, H, W, 3)`` (or ``(T, H, W)``) uint8 numpy array, a ``(T, 3, H, W)`` uint8
    tensor, or a list of PIL images / ``(H, W[, C])`` uint8 arrays, all of one size.
    """

    def __init__(self, frames: Any, fps: float, name: str = "the video") -> None:
        if isinstance(frames, (np.ndarray, torch.Tensor)):
            if frames.ndim not in (3, 4):
                raise ProcessorError(f"{name} is an array of shape {frames.shape}; expected (T, H, W, 3) frames",
                                     hint="stack the frames along a first, time axis")  # fmt: skip
            frames = list(frames)
        if isinstance(frames, (str, bytes, os.PathLike)) or not isinstance(frames, Sequence):
            raise ProcessorError(f"{name}: frames must be an array or a list of images, got {type(frames).__name__}",
                                 hint="for a folder of frames use Video.from_folder(path, fps=...)")  # fmt: skip
        self.frames = list(frames)
        self.fps = _check_rate(fps, name)
        self.name = name

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, fps: float) -> Video:
        """The image files of ``folder`` (names ending in ``FRAME_SUFFIXES``; other files are not
        frames) in natural name order (``f2.png`` before ``f10.png``) as frames shot at ``fps``."""
        path = Path(folder)
        if not path.is_dir():
            raise ProcessorError(f"video frames folder {str(path)!r} does not exist", hint="pass a folder of image files")
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural)
        return cls(files, fps, name=f"video {str(path)!r}")

    def __repr__(self) -> str:
        return f"Video({self.name}, {len(self.frames)} frames at {self.fps:g} fps)"


def _natural(path: Path) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.name)]


def _check_rate(fps: Any, name: str) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not fps > 0 or not np.isfinite(fps):
        raise ProcessorError(f"{name}: its frame rate must be a number > 0, got {fps!r}",
                             hint="pass the rate the frames were shot at, e.g. Video(frames, fps=30)")  # fmt: skip
    return float(fps)


@dataclass(frozen=True)
class VideoPlan:
    """Which frames of a video the model sees, decided from its header alone.

    ``total_frames`` at ``video_fps`` last ``duration`` seconds; ``indices`` are the kept frames;
    ``timestamps`` their times in seconds; ``size`` the ``(height, width)`` of every frame.
    """

    name: str
    total_frames: int
    video_fps: float
    duration: float
    indices: tuple[int, ...]
    size: tuple[int, int]

    @property
    def n_frames(self) -> int:
        return len(self.indices)

    @property
    def timestamps(self) -> tuple[float, ...]:
        return tuple(i / self.video_fps for i in self.indices)


class _Source:
    """A video's header (``name``, ``total``, ``fps``, ``size``) and a way to read chosen frames."""

    def __init__(self, name: str, total: int, fps: float, size: tuple[int, int]) -> None:
        if total < 1:
            raise ProcessorError(f"{name} has no frames", hint="pass a video with at least one frame")
        self.name, self.total, self.fps, self.size = name, total, fps, size

    def read(self, indices: Sequence[int]) -> list[Any]:
        raise NotImplementedError


class _Frames(_Source):
    """In-memory frames or a list of frame files (:class:`Video`)."""

    def __init__(self, video: Video) -> None:
        self.items = video.frames
        sizes = [self._size(k, item, video.name) for k, item in enumerate(self.items)]
        super().__init__(video.name, len(self.items), video.fps, sizes[0] if sizes else (0, 0))
        odd = next((k for k, s in enumerate(sizes) if s != sizes[0]), None)
        if odd is not None:
            raise ProcessorError(
                f"{video.name}: frame {odd} is {sizes[odd][0]}x{sizes[odd][1]} px (height x width) but frame 0 is "
                f"{sizes[0][0]}x{sizes[0][1]}; all frames of a video must have one size",
                hint="resize the frames to one size first, or pass them as separate images",
            )

    @staticmethod
    def _size(k: int, item: Any, name: str) -> tuple[int, int]:
        if isinstance(item, Path):
            try:
                with Image.open(item) as img:  # the header only
                    return img.height, img.width
            except (OSError, ValueError) as exc:
                raise ProcessorError(f"{name}: cannot read frame file {item.name!r}: {exc}",
                                     hint="the folder must hold only readable image files") from None  # fmt: skip
        where = f"frame {k} of {name}"
        size = image_size(item, where)
        check_format(item, where)
        return size

    def read(self, indices: Sequence[int]) -> list[Any]:
        out = []
        for i in indices:
            item = self.items[i]
            if isinstance(item, Path):  # within the byte and pixel bounds of docs/limits.md
                item = read_image_file(item)
            out.append(item)
        return out


class _FileSource(_Source):
    """A video file decoded with PyAV."""

    def __init__(self, path: Path) -> None:
        self.path = path
        name = f"video {str(path)!r}"
        av = _import_av()
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise ProcessorError(f"{name} has no video stream", hint="pass a file with a video track")
                stream = container.streams.video[0]
                rate = stream.average_rate
                # Some containers (mkv, webm) state no frame count: count the packets (no decoding).
                total = int(stream.frames) or sum(1 for packet in container.demux(stream) if packet.size)
                size = (int(stream.height), int(stream.width))
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise ProcessorError(f"cannot read {name}: {exc}",
                                 hint="pass a video file FFmpeg can decode (mp4, webm, mkv, avi, ...)") from None  # fmt: skip
        if not rate or float(rate) <= 0:
            raise ProcessorError(f"{name} states no frame rate", hint="re-encode it with a constant frame rate")
        super().__init__(name, total, float(rate), size)

    def read(self, indices: Sequence[int]) -> list[Any]:
        """The frames at ``indices`` as ``(H, W, 3)`` uint8 arrays; decodes up to the last one only."""
        av, wanted, out = _import_av(), set(int(i) for i in indices), {}
        last = max(wanted)
        try:
            with av.open(str(self.path)) as container:
                for k, frame in enumerate(container.decode(video=0)):
                    if k in wanted:
                        out[k] = frame.to_ndarray(format="rgb24")
                    if k >= last:
                        break
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise ProcessorError(f"cannot decode {self.name}: {exc}", hint="re-encode the file with ffmpeg") from None
        missing = sorted(wanted - set(out))
        if missing:
            raise ProcessorError(
                f"{self.name}: the container declares {self.total} frames but frame {missing[0]} could not be decoded",
                hint="re-encode it (ffmpeg -i in.mp4 out.mp4), or pass max_frames / fps that keep to the start",
            )
        return [out[i] for i in indices]


def _import_av():
    try:
        import av
    except ImportError:
        raise ProcessorError("reading video files needs PyAV, which is not installed",
                             hint=f"{_INSTALL}, or pass decoded frames as vlmkit.processor.Video(frames, fps=...)") from None  # fmt: skip
    return av


def open_video(item: Any, where: str) -> _Source:
    """The source of one video input (see the module docstring); reads headers only."""
    if isinstance(item, Video):
        return _Frames(item)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_dir():
            raise ProcessorError(f"{where} is the folder {str(path)!r}, which states no frame rate",
                                 hint="pass vlmkit.processor.Video.from_folder(path, fps=...) with the rate the frames were shot at")  # fmt: skip
        if not path.is_file():
            raise ProcessorError(f"{where}: no video file {str(path)!r}", hint="check the path")
        return _FileSource(path)
    raise ProcessorError(
        f"{where} is a {type(item).__name__}; expected a video file path or a vlmkit.processor.Video",
        hint="wrap decoded frames with their rate: Video(frames, fps=30)",
    )


def plan_video(source: _Source, sampling: VideoSampling, *, fps: float | None, max_frames: int | None) -> VideoPlan:
    """The frames of ``source`` the model sees with ``sampling`` (``fps`` / ``max_frames``: per-call overrides)."""
    fps = sampling.fps if fps is None else fps
    max_frames = sampling.max_frames if max_frames is None else max_frames
    indices = sample_indices(source.total, source.fps, fps=fps, max_frames=max_frames, skip_secs=sampling.skip_secs)
    return VideoPlan(source.name, source.total, source.fps, source.total / source.fps,
                     tuple(int(i) for i in indices), source.size)  # fmt: skip


def read_frames(source: _Source, plan: VideoPlan) -> list[Any]:
    """The planned frames (PIL images or ``(H, W, C)`` uint8 arrays), in order."""
    return source.read(plan.indices)


def videos_in_messages(messages: Sequence[Any]) -> list[Any]:
    """The videos of a conversation's ``{"type": "video", "path"|"video": ...}`` parts, in order."""
    found = []
    for message in messages:
        content = message.get("content") if hasattr(message, "get") else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "video":
                value = next((part[k] for k in ("video", "path", "url") if k in part), None)
                if value is None:
                    raise ProcessorError(f"a video part has no video: {part!r}",
                                         hint='write {"type": "video", "path": "clip.mp4"}')  # fmt: skip
                found.append(value)
    return found
