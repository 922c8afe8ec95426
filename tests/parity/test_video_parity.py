"""vlmkit's video input against transformers' SmolVLMProcessor / SmolVLMVideoProcessor on the
bundled SmolVLM2 files, and greedy generation on a video prompt against a tiny random
SmolVLMForConditionalGeneration.

The test videos are written here with PyAV (64x48 px, a few frames; nothing downloaded).
transformers decodes video files with torchcodec (not installed here), so the reference gets the
same file decoded by its own PyAV reader (``load_video(backend="pyav")``) with its metadata and
``do_sample_frames=True`` (what its ``apply_chat_template(tokenize=True)`` does).

input_ids must be identical. transformers resizes frames with torchvision, vlmkit with Pillow (as
its image path); pixel values must agree within transformers' own fast-vs-slow image backend
spread, 0.025 (measured in tests/parity/test_processor_parity.py). Measured here: at most 0.0157
(2 uint8 levels after normalization with std 0.5), the same as transformers' torch-vs-PIL gap on
the same frames (``test_pixel_gap_is_transformers_own_spread``).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.processor import load_processor
from vlmkit.processor.video import Video

from ..conftest import published_folder
from .tiny_video import tiny_smolvlm2, write_video

transformers = pytest.importorskip("transformers")
av = pytest.importorskip("av")
pytest.importorskip("num2words")  # transformers' SmolVLMProcessor needs it
from transformers.video_utils import load_video  # noqa: E402

PIXEL_TOL = 0.025
PROMPT = "<|im_start|>User: <video>What happens?<end_of_utterance>\nAssistant:"


def _all_frames(path):
    return load_video(str(path), backend="pyav", sample_indices_fn=lambda metadata, **_: np.arange(metadata.total_num_frames))


@pytest.fixture(scope="module", params=["SmolVLM2-500M-Video-Instruct", "SmolVLM2-256M-Video-Instruct"])
def pair(request):
    """(vlmkit processor, transformers SmolVLMProcessor) on one bundled SmolVLM2 folder."""
    folder = published_folder(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the published files' bos/eos/pad disagreements, asserted elsewhere
        ours = load_processor(folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    from transformers.models.smolvlm import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    ref = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**pre), video_processor=SmolVLMVideoProcessor(**pre),
                           tokenizer=transformers.AutoTokenizer.from_pretrained(str(folder)), image_seq_len=64)  # fmt: skip
    return ours, ref


def _ref_call(ref, prompt, frames, metadata, **kwargs):
    return ref(text=prompt, videos=frames, video_metadata=metadata, do_sample_frames=True, return_tensors="pt", **kwargs)


def _assert_same(ours_out, ref_out):
    assert torch.equal(ours_out["input_ids"], ref_out["input_ids"])
    assert torch.equal(ours_out["attention_mask"], ref_out["attention_mask"])
    assert ours_out["pixel_values"].shape == ref_out["pixel_values"].shape
    diff = (ours_out["pixel_values"] - ref_out["pixel_values"]).abs().max().item()
    assert diff <= PIXEL_TOL, diff


# (frames in the file, file fps, per-call options): fewer frames than max_frames; more (capped,
# with the 1-second skip at both ends); fps values; a max_frames override.
CASES = [
    (30, 10, {}),  # 3 s at 1 fps: 3 frames
    (100, 10, {"max_frames": 4}),  # 10 s: capped at 4, first and last second skipped
    (25, 5, {"fps": 2}),
    (40, 10, {"fps": 0.5}),
    (12, 24, {"fps": 7.5}),  # half a second: round(3.75) = 4 frames
    (90, 30, {"fps": 3.3, "max_frames": 64}),
]


@pytest.mark.parametrize(("n", "rate", "options"), CASES, ids=[f"{n}f-{r}fps-{o}" for n, r, o in CASES])
def test_video_file_matches(pair, tmp_path, n, rate, options):
    ours, ref = pair
    path = write_video(tmp_path / "clip.mp4", n, rate)
    frames, metadata = _all_frames(path)
    ref_opts = {"fps": options.get("fps", ref.video_processor.fps), "num_frames": options.get("max_frames", ref.video_processor.num_frames)}
    _assert_same(ours(text=PROMPT, videos=[path], **options), _ref_call(ref, PROMPT, [frames], [metadata], **ref_opts))


def test_pixel_gap_is_transformers_own_spread(tmp_path):
    """vlmkit (Pillow) vs transformers' video processor (torchvision) is no larger than
    transformers' own torch vs PIL image processors on the same frames, as unsplit images."""
    from transformers.models.smolvlm import SmolVLMImageProcessor, SmolVLMImageProcessorPil, SmolVLMVideoProcessor

    folder = published_folder("SmolVLM2-500M-Video-Instruct")
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_processor(folder)
    video, fast, slow = SmolVLMVideoProcessor(**pre), SmolVLMImageProcessor(**pre), SmolVLMImageProcessorPil(**pre)
    ours_gap, spread = [], []
    for n, rate, seed in ((30, 10, 0), (25, 5, 2)):
        path = write_video(tmp_path / f"clip{n}.mp4", n, rate, seed=seed)
        frames, metadata = _all_frames(path)
        ref = video(videos=[frames], video_metadata=[metadata], do_sample_frames=True, return_tensors="pt")["pixel_values"][0]
        ours_gap.append((ours(text="<video>", videos=[path])["pixel_values"][0] - ref).abs().max().item())
        images = [[f] for f in frames[:3]]
        a = fast(images=images, do_image_splitting=False, return_tensors="pt")["pixel_values"]
        b = slow(images=images, do_image_splitting=False, return_tensors="pt")["pixel_values"]
        spread.append((a - b).abs().max().item())
    assert 0 < max(ours_gap) <= max(spread) <= PIXEL_TOL, (ours_gap, spread)


def test_frames_array_and_still_image(pair, tmp_path):
    ours, ref = pair
    frames, metadata = _all_frames(write_video(tmp_path / "clip.mp4", 20, 10))
    ours_out = ours(text=PROMPT, videos=[Video(frames, fps=10)])
    _assert_same(ours_out, _ref_call(ref, PROMPT, [frames], [metadata]))
    still = Image.fromarray(frames[3])  # a still image as a 1-frame video
    meta = {"total_num_frames": 1, "fps": 1.0, "duration": 1.0, "height": 48, "width": 64}
    _assert_same(ours(text=PROMPT, videos=[Video([still], fps=1)]), _ref_call(ref, PROMPT, [np.asarray(still)[None]], [meta]))


def test_chat_template_with_video_matches(pair, tmp_path):
    ours, ref = pair
    path = str(write_video(tmp_path / "clip.mp4", 10, 10))
    messages = [{"role": "user", "content": [{"type": "video", "path": path}, {"type": "text", "text": "What happens?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A fade."}]},
                {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]}]  # fmt: skip
    for add in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == ref.apply_chat_template(
            messages, add_generation_prompt=add, tokenize=False
        )


def test_mixed_image_and_video_prompt(pair, tmp_path):
    """input_ids identical; pixel_values: the image's tiles then the video's frames, in prompt order.

    transformers 5.24 builds the same input_ids but returns only the video's pixel_values (its
    video output overwrites the image one), so the reference pixels are its image processor's
    tiles followed by its video processor's frames.
    """
    ours, ref = pair
    frames, metadata = _all_frames(write_video(tmp_path / "clip.mp4", 30, 10))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    prompt = "<|im_start|>User:<image>Look at this, then<video>What changed?<end_of_utterance>\nAssistant:"
    got = ours(text=prompt, images=[image], videos=[tmp_path / "clip.mp4"])
    want = _ref_call(ref, prompt, [frames], [metadata], images=[[image]])
    assert torch.equal(got["input_ids"], want["input_ids"])
    image_tiles = ref.image_processor(images=[[image]], return_tensors="pt")["pixel_values"][0]
    video_frames = ref.video_processor(videos=[frames], video_metadata=[metadata], do_sample_frames=True, return_tensors="pt")
    expected = torch.cat([image_tiles, video_frames["pixel_values"][0]])[None]
    assert got["pixel_values"].shape == expected.shape == (1, image_tiles.shape[0] + 3, 3, 512, 512)
    assert (got["pixel_values"] - expected).abs().max().item() <= PIXEL_TOL
    assert int((got["input_ids"] == ours.image_token_id).sum()) == expected.shape[1] * 64


def test_two_videos_of_different_lengths(pair, tmp_path):
    """Each video's intro states its own frame count. (transformers 5.24 writes the batch's
    largest count for every video, as it reads pixel_values.shape[1] after padding: only the
    intro differs there, so it is compared with that line fixed.)"""
    ours, ref = pair
    a, b = write_video(tmp_path / "a.mp4", 30, 10), write_video(tmp_path / "b.mp4", 50, 10, seed=2)
    prompt = "User: <video> then <video> Compare."
    got = ours(text=prompt, videos=[a, b])
    text = ours.decode(got["input_ids"][0])
    assert "series of three frames from a 0:00:03" in text and "series of five frames from a 0:00:05" in text
    (fa, ma), (fb, mb) = _all_frames(a), _all_frames(b)
    want = _ref_call(ref, prompt, [fa, fb], [ma, mb])
    want_text = ref.tokenizer.decode(want["input_ids"][0])
    assert want_text.replace("series of five frames from a 0:00:03", "series of three frames from a 0:00:03") == text
    assert got["pixel_values"].shape == (1, 8, 3, 512, 512)  # one sample: 3 + 5 frames
    ref_frames = torch.cat([want["pixel_values"][0, :3], want["pixel_values"][1, :5]])
    assert (got["pixel_values"][0] - ref_frames).abs().max().item() <= PIXEL_TOL


# ----------------------------------------------------------------------------- greedy generation


def test_greedy_generation_on_video_prompt_matches(tmp_path, one_thread):
    import vlmkit
    from vlmkit.generation import default_pad_id, default_stop_ids

    folder = tmp_path / "tiny-smolvlm2"
    hf = tiny_smolvlm2(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = vlmkit.load_processor(folder)
        model = vlmkit.build_from_hf(folder)
    clip = write_video(tmp_path / "clip.mp4", 40, 10)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    video_only = [{"type": "video", "path": str(clip)}, {"type": "text", "text": "What happens?"}]
    mixed = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "video", "path": str(clip)}]
    stops, pad = default_stop_ids(model), default_pad_id(model)
    for content, images in ((video_only, None), (mixed, [image])):
        text = proc.apply_chat_template([{"role": "user", "content": content}])
        batch = proc(text=text, images=images, videos=[clip], fps=2)
        assert batch["pixel_values"].shape[1] == 8 + (len(images) if images else 0) * 5  # 8 frames (+ 2x2+1 tiles)
        got = model.generate(**batch, max_new_tokens=10)
        with torch.no_grad():
            want = hf.generate(**batch, do_sample=False, max_new_tokens=10, eos_token_id=stops, pad_token_id=pad)
        assert torch.equal(got, want), (got.tolist(), want.tolist())
