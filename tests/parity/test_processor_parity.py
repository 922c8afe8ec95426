"""vlmkit's processor against transformers' Idefics3Processor on the published SmolVLM files.

Token ids, attention masks and pixel attention masks must be identical. Pixel values are
compared with transformers' PIL-backend image processor (``Idefics3ImageProcessorPil``), which
resizes with Pillow in uint8 exactly as vlmkit does: measured max abs difference 0.0 on every
case here. The tolerance of 0.025 is the gap between transformers' own two backends: its torch
("fast") image processor differs from its PIL one by up to 0.0235 (3 uint8 levels after
normalization with std 0.5; 0.0157 = 2 levels on most RGB images, 0.0235 on RGBA because it
composites alpha in float), measured in ``test_fast_backend_gap_justifies_tolerance``.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.processor import load_processor

from ..conftest import published_folder

transformers = pytest.importorskip("transformers")

PIXEL_TOL = 0.025


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A gradient-plus-noise test image of ``width x height`` in ``mode``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 7 % 256], -1)
    rgb = np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    image = Image.fromarray(rgb)
    if mode == "P+transparency":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 3
        return image
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE)
    return image.convert(mode)


@pytest.fixture(scope="module")
def ref(folder):
    """transformers' Idefics3Processor with the PIL image backend."""
    proc = transformers.AutoProcessor.from_pretrained(str(folder), backend="pil")
    assert type(proc.image_processor).__name__ == "Idefics3ImageProcessorPil"
    return proc


def _assert_same(ours_out, ref_out) -> None:
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(ours_out[key], ref_out[key]), key
    if "pixel_values" in ref_out:
        assert ours_out["pixel_values"].shape == ref_out["pixel_values"].shape
        assert ours_out["pixel_values"].dtype == torch.float32
        assert torch.equal(ours_out["pixel_attention_mask"], ref_out["pixel_attention_mask"].to(torch.int64))
        diff = (ours_out["pixel_values"] - ref_out["pixel_values"]).abs().max().item()
        assert diff <= PIXEL_TOL, diff
    else:
        assert "pixel_values" not in ours_out


CASES = [
    (1, 1, "RGB"),  # upscaled to 2048x2048: 4x4 tiles + global
    (17, 33, "RGB"),
    (512, 512, "RGB"),
    (640, 480, "L"),
    (1000, 200, "RGBA"),  # very wide
    (200, 1500, "P"),  # very tall
    (33, 17, "P+transparency"),
    (3000, 2000, "RGB"),  # big, downscaled
    (2049, 10, "LA"),
]


@pytest.mark.parametrize(("width", "height", "mode"), CASES, ids=[f"{w}x{h}-{m}" for w, h, m in CASES])
def test_single_image_matches(ours, ref, width, height, mode):
    image = _image(width, height, mode)
    prompt = "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:"
    _assert_same(ours(text=prompt, images=image), ref(text=prompt, images=image, return_tensors="pt"))


@pytest.mark.parametrize(
    ("ours_kwargs", "ref_kwargs"),
    [
        ({"do_image_splitting": False}, {"do_image_splitting": False}),
        ({"longest_edge": 1024}, {"size": {"longest_edge": 1024}}),
        ({"longest_edge": 300}, {"size": {"longest_edge": 300}}),
        ({"longest_edge": 3000}, {"size": {"longest_edge": 3000}}),  # 6x6 tiles: the largest grid with tokens
    ],
    ids=["no-split", "edge1024", "edge300", "edge3000"],
)
def test_per_call_options_match(ours, ref, ours_kwargs, ref_kwargs):
    image = _image(640, 480)
    prompt = "User:<image>What is it?"
    _assert_same(
        ours(text=prompt, images=image, **ours_kwargs),
        ref(text=prompt, images=image, return_tensors="pt", **ref_kwargs),
    )


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prompts_with_0_1_2_images(ours, ref, n_images):
    images = [_image(300 + 100 * k, 200, seed=k) for k in range(n_images)]
    prompt = "User:" + "".join(f"Image {k}: <image>\n" for k in range(n_images)) + "Compare them."
    _assert_same(
        ours(text=prompt, images=images or None),
        ref(text=prompt, images=images or None, return_tensors="pt"),
    )


def test_padded_batch_with_different_image_counts(ours, ref):
    texts = ["User:<image>One image, a longer question here?", "User:<image> and <image> two."]
    images = [[_image(640, 480)], [_image(200, 1500, "P", seed=1), _image(1, 1, seed=2)]]
    ours_out = ours(text=texts, images=images, padding=True)
    _assert_same(ours_out, ref(text=texts, images=images, return_tensors="pt", padding=True))
    assert ours_out["pixel_attention_mask"][0, 13:].sum() == 0  # sample 0 has 13 tiles, padded to 22
    # A flat list of images is shared out by each prompt's <image> count, as in transformers.
    flat_out = ours(text=texts, images=[images[0][0], *images[1]])
    assert all(torch.equal(flat_out[k], ours_out[k]) for k in ours_out)


def test_text_only_batch(ours, ref):
    texts = ["Hello there, 123 456!", "A much longer prompt with\nnewlines\n\nand  spaces and émojis 🙂."]
    _assert_same(ours(text=texts), ref(text=texts, return_tensors="pt", padding=True))


def test_left_padding_from_tokenizer_config(folder, tmp_path):
    copy = tmp_path / "left"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["padding_side"] = "left"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_processor(copy)
    ref = transformers.AutoProcessor.from_pretrained(str(copy), backend="pil")
    texts = ["short <image>", "a much longer prompt <image> here"]
    images = [_image(100, 100), _image(50, 80, seed=3)]
    out = ours(text=texts, images=images, longest_edge=512)
    _assert_same(out, ref(text=texts, images=images, return_tensors="pt", padding=True, size={"longest_edge": 512}))
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1


def test_chat_template_matches(ours, ref):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
    ]
    for add in (True, False):
        expected = ref.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected


def test_decode_matches(ours, ref):
    prompt = "User:<image>Describe, please: 42 naïve ☃.<end_of_utterance>\nAssistant: It is<end_of_utterance>"
    ids = ours(text=prompt, images=_image(64, 64), do_image_splitting=False)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids[0], skip_special_tokens=skip) == ref.tokenizer.decode(ids[0], skip_special_tokens=skip)
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)


def test_fast_backend_gap_justifies_tolerance(folder, ref):
    """transformers' torch backend vs its PIL backend: measured max diff 0.0157 (RGB), 0.0235 (RGBA)."""
    fast = transformers.AutoProcessor.from_pretrained(str(folder))
    assert type(fast.image_processor).__name__ == "Idefics3ImageProcessor"
    gaps = []
    for image in (_image(640, 480), _image(1000, 200, "RGBA")):
        a = ref(text="<image>", images=image, return_tensors="pt")["pixel_values"]
        b = fast(text="<image>", images=image, return_tensors="pt")["pixel_values"]
        gaps.append((a - b).abs().max().item())
    assert 0 < max(gaps) <= PIXEL_TOL, gaps


def test_smolvlm2_256m_matches():
    """SmolVLM2-256M: no tokenizer_config.json, so transformers' tokenizer has no pad token."""
    folder = published_folder("SmolVLM2-256M-Video-Instruct")
    try:
        from transformers.models.smolvlm import SmolVLMImageProcessorPil

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        image_processor = SmolVLMImageProcessorPil(**json.loads((folder / "preprocessor_config.json").read_text()))
        # SmolVLMProcessor needs the optional num2words package (for video prompts); its image
        # prompts are the Idefics3 ones, so Idefics3Processor is the reference here.
        ref = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64)
    except (ImportError, OSError, ValueError, TypeError) as exc:  # pragma: no cover - depends on transformers
        pytest.skip(f"transformers cannot build a SmolVLM2 processor from {folder}: {exc}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its config.json has an out-of-vocab top-level pad_token_id
        v2 = load_processor(folder)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(v2.pad_token_id)  # what vlmkit pads with
    texts = ["User:<image>Caption this.", "User: no image, just text that is long enough"]
    images = [[_image(640, 480)], []]
    _assert_same(v2(text=texts, images=images), ref(text=texts, images=images, return_tensors="pt", padding=True))
