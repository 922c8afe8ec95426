"""Video input: bad input gets a vlmkit error naming the video and what to do; sampling and the
prompt layout follow the checkpoint's files."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from vlmkit.components.idefics3_video import number_words
from vlmkit.errors import ProcessorError, SpecError
from vlmkit.processor import load_processor
from vlmkit.processor.video import Video, sample_indices

from ..conftest import published_folder

av = pytest.importorskip("av")

PROMPT = "User: <video>What happens?"


def write_video(path, n_frames: int, fps: int = 10, width: int = 64, height: int = 48):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if not n_frames:
            container.start_encoding()  # write the header of a stream with no frames
        for i in range(n_frames):
            frame = np.full((height, width, 3), i * 7 % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def proc():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_processor(published_folder("SmolVLM2-500M-Video-Instruct"))


@pytest.fixture
def clip(tmp_path):
    return write_video(tmp_path / "clip.mp4", 30)


def test_sampling_comes_from_the_checkpoint(proc):
    assert proc.video_token == "<video>"
    s = proc.video.sampling
    assert (s.fps, s.max_frames) == (1.0, 64)
    # video_size is 512 but, as in transformers, `size` (2048) replaces it; frames are then squeezed to the tile
    assert s.longest_edge == 2048 and proc.settings.tile == 512


def test_unreadable_video_names_the_file(proc, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    with pytest.raises(ProcessorError, match="cannot read video .*broken.mp4") as info:
        proc(text=PROMPT, videos=[bad])
    assert "FFmpeg can decode" in info.value.hint
    with pytest.raises(ProcessorError, match="no video file .*missing.mp4"):
        proc(text=PROMPT, videos=[tmp_path / "missing.mp4"])


def test_zero_frame_video(proc, tmp_path):
    empty = write_video(tmp_path / "empty.avi", 0)  # AVI keeps a video stream of 0 frames (mp4 drops it)
    with pytest.raises(ProcessorError, match="empty.avi.* has no frames") as info:
        proc(text=PROMPT, videos=[empty])
    assert "at least one frame" in info.value.hint
    no_track = write_video(tmp_path / "empty.mp4", 0)  # mp4 drops a track without samples
    with pytest.raises(ProcessorError, match="empty.mp4.* has no video stream"):
        proc(text=PROMPT, videos=[no_track])
    with pytest.raises(ProcessorError, match="has no frames"):
        proc(text=PROMPT, videos=[Video([], fps=5, name="my clip")])
    (tmp_path / "frames").mkdir()
    with pytest.raises(ProcessorError, match="frames.* has no frames"):
        proc(text=PROMPT, videos=[Video.from_folder(tmp_path / "frames", fps=5)])


def test_container_without_a_frame_count(proc, tmp_path):
    """Matroska states no frame count in its header: vlmkit counts the packets instead."""
    mkv = write_video(tmp_path / "clip.mkv", 25)
    with av.open(str(mkv)) as container:
        assert container.streams.video[0].frames == 0
    plan = proc.prompt_cost(PROMPT, videos=[mkv]).videos[0]
    assert (plan.total_frames, plan.duration, plan.indices) == (25, 2.5, (0, 24))
    assert proc(text=PROMPT, videos=[mkv])["pixel_values"].shape[1] == 2


def test_video_without_placeholder_and_the_reverse(proc, clip):
    with pytest.raises(ProcessorError, match=r"do not match the <video> placeholders \(sample 0: 0 placeholder\(s\), 1 video") as info:
        proc(text="User: no placeholder here", videos=[clip])
    assert "one <video> per video" in info.value.hint
    with pytest.raises(ProcessorError, match="1 <video> placeholder.* but no video was passed"):
        proc(text=PROMPT)


def test_chat_template_without_a_video_part(proc, clip):
    """A family layout without its own video template falls back to the checkpoint's, which has
    no video part: the rendering would drop the video, so it is refused."""
    messages = [{"role": "user", "content": [{"type": "video", "path": str(clip)}, {"type": "text", "text": "Hi"}]}]
    assert "<video>" in proc.apply_chat_template(messages)
    plain = dataclasses.replace(proc.video, chat_template=None)
    other = type(proc)(proc.tokenizer, proc.settings, proc.spec, chat_template=proc.template, video_layout=plain)
    with pytest.raises(ProcessorError, match="1 video part.* wrote 0 <video> placeholder") as info:
        other.apply_chat_template(messages)
    assert "chat_template.json" in str(info.value)
    with pytest.raises(ProcessorError, match="has no video"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_checkpoint_without_video(clip):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v1 = load_processor(published_folder("SmolVLM-256M-Instruct"))
    assert v1.video is None and v1.video_token is None
    with pytest.raises(ProcessorError, match="takes no video"):
        v1(text="User: <video>?", videos=[clip])
    with pytest.raises(ProcessorError, match="takes no video"):
        v1.apply_chat_template([{"role": "user", "content": [{"type": "video", "path": str(clip)}]}])


@pytest.mark.parametrize("max_frames", [0, -3, 1.5, True, "8"])
def test_max_frames_below_one(proc, clip, max_frames):
    with pytest.raises(ProcessorError, match=f"max_frames must be an integer >= 1, got {max_frames!r}"):
        proc(text=PROMPT, videos=[clip], max_frames=max_frames)


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf"), "2"])
def test_fps_not_positive(proc, clip, fps):
    with pytest.raises(ProcessorError, match="fps must be a number of frames per second > 0"):
        proc(text=PROMPT, videos=[clip], fps=fps)
    with pytest.raises(ProcessorError, match="frame rate must be a number > 0"):
        Video(np.zeros((2, 8, 8, 3), np.uint8), fps=fps)


def test_frames_of_different_sizes(proc, tmp_path):
    frames = [Image.new("RGB", (64, 48)), Image.new("RGB", (64, 48)), Image.new("RGB", (48, 64))]
    with pytest.raises(ProcessorError, match=r"my clip: frame 2 is 64x48 px .* but frame 0 is 48x64") as info:
        proc(text=PROMPT, videos=[Video(frames, fps=2, name="my clip")])
    assert "one size" in info.value.hint
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, frame in enumerate(frames):
        frame.save(folder / f"{k:03d}.png")
    with pytest.raises(ProcessorError, match=r"frames'.*: frame 2 is 64x48"):
        proc(text=PROMPT, videos=[Video.from_folder(folder, fps=2)])


def test_folder_of_frames_needs_its_rate_and_matches_the_list(proc, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = [Image.fromarray(np.full((48, 64, 3), 30 * k, np.uint8)) for k in range(6)]
    for k, frame in enumerate(frames):
        frame.save(folder / f"{k:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    with pytest.raises(ProcessorError, match="folder .* states no frame rate") as info:
        proc(text=PROMPT, videos=[folder])
    assert "Video.from_folder(path, fps=...)" in info.value.hint
    order = [p.name for p in Video.from_folder(folder, fps=2).frames]
    assert order == [f"{k:03d}.png" for k in range(6)]
    (tmp_path / "n").mkdir()
    for name in ("f10.png", "f2.png", "f1.png"):
        frames[0].save(tmp_path / "n" / name)
    assert [p.name for p in Video.from_folder(tmp_path / "n", fps=1).frames] == ["f1.png", "f2.png", "f10.png"]
    got = proc(text=PROMPT, videos=[Video.from_folder(folder, fps=2)])
    want = proc(text=PROMPT, videos=[Video(frames, fps=2)])
    assert (got["input_ids"] == want["input_ids"]).all() and (got["pixel_values"] == want["pixel_values"]).all()
    assert got["pixel_values"].shape[1] == 3  # 3 s at 1 fps


def test_bare_arrays_need_a_rate(proc):
    with pytest.raises(ProcessorError, match="expected a video file path or a vlmkit.processor.Video") as info:
        proc(text=PROMPT, videos=[np.zeros((4, 8, 8, 3), np.uint8)])
    assert "Video(frames, fps=30)" in info.value.hint
    with pytest.raises(ProcessorError, match="expected uint8"):
        proc(text=PROMPT, videos=[Video(np.zeros((4, 8, 8, 3), np.float32), fps=4)])
    import torch

    frames = np.random.default_rng(0).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    channels_first = Video(torch.from_numpy(frames).permute(0, 3, 1, 2), fps=2)  # (T, 3, H, W), as torchvision
    got = proc(text=PROMPT, videos=[channels_first])["pixel_values"]
    assert torch.equal(got, proc(text=PROMPT, videos=[Video(frames, fps=2)])["pixel_values"])


def test_missing_pyav_names_the_extra(proc, clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(ProcessorError, match="needs PyAV") as info:
        proc(text=PROMPT, videos=[clip])
    assert "pip install 'vlmkit[video]'" in info.value.hint


def test_cost_without_decoding_and_the_budget(proc, clip, monkeypatch):
    from vlmkit.processor import video_prompt

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(video_prompt, "read_frames", no_decoding)
    with pytest.raises(AssertionError, match="a frame was decoded"):  # the patch bites where frames are read
        proc(text=PROMPT, videos=[clip])
    cost = proc.prompt_cost(PROMPT, videos=[clip], max_frames=2)
    assert cost.videos[0].n_frames == 2 and cost.visual_tokens == 2 * 64
    assert cost.total_tokens == cost.text_tokens + cost.visual_tokens
    with pytest.raises(ProcessorError, match=r"costs 192 visual tokens \(3 frames x 64\), over max_visual_tokens=150") as info:
        proc(text=PROMPT, videos=[clip], max_visual_tokens=150)  # refused before any frame is decoded
    assert "max_frames=2" in info.value.hint


def test_bad_video_sampling_config(tmp_path):
    copy = tmp_path / "v2"
    shutil.copytree(published_folder("SmolVLM2-500M-Video-Instruct"), copy)
    pre = json.loads((copy / "preprocessor_config.json").read_text())
    pre["video_sampling"]["max_frames"] = 0
    (copy / "preprocessor_config.json").write_text(json.dumps(pre))
    with warnings.catch_warnings(), pytest.raises(SpecError) as info:
        warnings.simplefilter("ignore")
        load_processor(copy)
    assert info.value.key_path == "video_sampling.max_frames" and "preprocessor_config.json" in str(info.value)


def test_smolvlm2_256m_folder_chat_template():
    """The bundled SmolVLM2-256M files carry no chat template (none was published-and-verifiable);
    a conversation with a video still renders, with the family's video template (as transformers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v2 = load_processor(published_folder("SmolVLM2-256M-Video-Instruct"))
    assert v2.chat_template is None
    with pytest.raises(ProcessorError, match="no chat template"):
        v2.apply_chat_template([{"role": "user", "content": "hi"}])
    messages = [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}, {"type": "text", "text": "Why?"}]}]
    assert v2.apply_chat_template(messages) == "<|im_start|>User: <video>Why?<end_of_utterance>\nAssistant:"


def test_number_words_match_num2words():
    num2words = pytest.importorskip("num2words").num2words
    for n in [*range(0, 1200), 1999, 2000, 10001, 12345, 100000, 999999]:
        assert number_words(n) == num2words(n), n
    with pytest.raises(ProcessorError):
        number_words(1_000_000)


def test_sample_indices_match_transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("num2words")
    from transformers.models.smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    ref = SmolVLMVideoProcessor()
    for total in (1, 2, 7, 30, 100, 301, 1000):
        for rate in (1, 10, 24, 29.97):
            for fps in (0.5, 1, 2, 3.3):
                for max_frames in (1, 4, 64):
                    meta = VideoMetadata(total_num_frames=total, fps=rate, duration=total / rate)
                    want = ref.sample_frames(meta, num_frames=max_frames, fps=fps)
                    got = sample_indices(total, rate, fps=fps, max_frames=max_frames)
                    assert got.tolist() == list(want), (total, rate, fps, max_frames)
    assert transformers.__version__
