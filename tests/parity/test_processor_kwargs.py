"""Every processor / apply_chat_template keyword vlmkit accepts, against transformers' Idefics3Processor
(PIL image backend, bit-identical pixels) on the bundled SmolVLM files.

Images are small synthetic gradients; sizes are chosen for 1x1, 2x2, 3x4 and 4x4 tile grids.
The transformers processor is built once per module.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.errors import ProcessorError
from vlmkit.processor import load_processor

from ..conftest import published_folder

transformers = pytest.importorskip("transformers")


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 7 % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def ref(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoProcessor.from_pretrained(str(folder), backend="pil")


def _same(mine, theirs) -> None:
    """Every key transformers returns is in ours, with equal values (tensors, arrays or lists)."""
    assert set(theirs.keys()) <= set(mine.keys()), (sorted(mine.keys()), sorted(theirs.keys()))
    for key in theirs.keys():
        a, b = mine[key], theirs[key]
        if isinstance(b, (torch.Tensor, np.ndarray)):
            assert type(a) is type(b), key
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            assert a.shape == b.shape, (key, a.shape, b.shape)
            if a.is_floating_point():
                assert torch.allclose(a, b.to(a.dtype), atol=1e-6, rtol=1e-6), (key, (a - b).abs().max())
            else:
                assert torch.equal(a, b.to(a.dtype)), key
        else:
            assert a == b, key


# ----------------------------------------------------------------------------- image keywords

IMAGE_CASES = [
    {"do_rescale": False},
    {"rescale_factor": 1 / 127.5},
    {"do_normalize": False},
    {"do_resize": False},
    {"do_resize": False, "do_image_splitting": True, "size": {"longest_edge": 2048}},
    {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1]},
    {"resample": Image.Resampling.BILINEAR},
    {"resample": 3},
    {"size": {"longest_edge": 1024}},
    {"do_image_splitting": False},
    {"max_image_size": {"longest_edge": 512}},
    {"return_row_col_info": True},
    {"do_convert_rgb": True},
    {"images_kwargs": {"do_image_splitting": False, "do_normalize": False}},
    {"common_kwargs": {"return_tensors": "pt"}, "images_kwargs": {"size": {"longest_edge": 1024}}},
]


@pytest.mark.parametrize("kwargs", IMAGE_CASES, ids=lambda k: ",".join(k))
def test_image_keywords(ours, ref, kwargs):
    base = {"size": {"longest_edge": 1024}} if not any(k in kwargs for k in ("size", "images_kwargs")) else {}
    image = _image(300, 400, seed=1)
    mine = ours(text="<image>Describe.", images=image, **{**base, **kwargs})
    theirs = ref(text="<image>Describe.", images=image, return_tensors="pt", **{**base, **kwargs})
    _same(mine, theirs)


@pytest.mark.parametrize(
    ("size", "kwargs", "grid"),
    [
        ((300, 400), {"size": {"longest_edge": 512}}, (0, 0)),  # one tile
        ((256, 256), {"size": {"longest_edge": 1024}}, (2, 2)),
        ((480, 640), {"return_mm_token_type_ids": True}, (3, 4)),
        ((64, 64), {}, (4, 4)),
    ],
    ids=["1x1", "2x2", "3x4", "4x4"],
)
def test_tile_grids_and_patch_counts(ours, ref, size, kwargs, grid):
    image = _image(*size, seed=2)
    assert ours.image_cost(size, **kwargs).tiles == grid
    assert ours.get_number_of_image_patches(*size, kwargs) == ref.image_processor.get_number_of_image_patches(
        *size, kwargs
    )
    _same(ours(text="A<image>B", images=image, **kwargs), ref(text="A<image>B", images=image, return_tensors="pt", **kwargs))


def test_patch_counts_without_splitting(ours, ref):
    for size in [(480, 640), (64, 64), (3000, 100)]:
        kw = {"do_image_splitting": False}
        assert ours.get_number_of_image_patches(*size, kw) == ref.image_processor.get_number_of_image_patches(*size, kw)
        assert ours.image_cost(size, **kw).patches == (0, 0, 0)


# ----------------------------------------------------------------------------- batches, padding, truncation

BATCH = ["<image><image>Compare these two.", "<image>One image and a much longer question about it?", "No image."]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_with_different_image_counts(ours, ref, side):
    images = [[_image(40, 60, 3), _image(70, 50, 4)], [_image(50, 50, 5)], []]
    kwargs = {"do_image_splitting": False, "padding": True, "padding_side": side, "return_mm_token_type_ids": True}
    mine = ours(text=BATCH, images=images, **kwargs)
    theirs = ref(text=BATCH, images=images, return_tensors="pt", **kwargs)
    assert theirs["mm_token_type_ids"].sum(1).tolist() == [2 * 67, 67, 0]  # <fake><global-img>64 x <image><fake>
    _same(mine, theirs)
    assert mine["attention_mask"][2, 0 if side == "left" else -1] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": "max_length", "max_length": 40},
        {"padding": "longest", "pad_to_multiple_of": 8},
        {"padding": True, "truncation": True, "max_length": 6},
        {"padding": "max_length", "truncation": True, "max_length": 5, "padding_side": "left"},
        {"text_kwargs": {"padding": "max_length", "max_length": 12}},
        {"padding": True, "return_attention_mask": False},
        {"padding": True, "return_token_type_ids": True},
        {"padding": True, "return_length": True},
        {"padding": True, "return_special_tokens_mask": True},
        {"padding": True, "return_offsets_mapping": True, "padding_side": "left"},
        {"padding": True, "return_offsets_mapping": True, "truncation": True, "max_length": 5},
        {"padding": True, "return_special_tokens_mask": True, "padding_side": "left", "truncation": True, "max_length": 7},
        {"padding": True, "add_special_tokens": False},
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_text_keywords(ours, ref, kwargs):
    texts = ["A short one.", "A somewhat longer prompt with more words in it."]
    _same(ours(text=texts, **kwargs), ref(text=texts, return_tensors="pt", **kwargs))


def test_truncation_keeps_whole_images(ours, ref):
    """Truncation that only cuts text (tokenizer_config.json truncation_side) matches transformers."""
    text = "Many words before the picture, " * 3 + "<image>What is it?"
    image = _image(50, 50, 6)
    kwargs = {"do_image_splitting": False, "truncation": True, "max_length": 80}
    _same(ours(text=text, images=image, **kwargs), ref(text=text, images=image, return_tensors="pt", **kwargs))


def test_truncation_that_cuts_image_tokens_is_refused(ours, ref):
    image = _image(50, 50, 7)
    kwargs = {"do_image_splitting": False, "truncation": True, "max_length": 30}
    with pytest.raises(ProcessorError, match=r"max_length=30 would cut its image tokens \(\d+ of 64 left\)"):
        ours(text="<image>What is it?", images=image, **kwargs)
    with pytest.raises((ValueError, TypeError)):  # transformers refuses it too
        ref(text="<image>What is it?", images=image, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("tensors", ["np", None])
def test_return_tensors(ours, ref, tensors):
    image = _image(40, 40, 8)
    kwargs = {"do_image_splitting": False, "return_tensors": tensors, "return_offsets_mapping": True}
    mine = ours(text=["<image>a", "<image>b c"], images=[image, image], padding=True, **kwargs)
    theirs = ref(text=["<image>a", "<image>b c"], images=[image, image], padding=True, **kwargs)
    if tensors is None:  # transformers' image processor returns arrays or lists; compare the text fields
        assert mine["offset_mapping"] == theirs["offset_mapping"]
        assert isinstance(mine["input_ids"], list)
        assert mine["input_ids"] == theirs["input_ids"] and mine["attention_mask"] == theirs["attention_mask"]
        assert np.array_equal(np.asarray(mine["pixel_values"]), np.asarray(theirs["pixel_values"]))
    else:
        _same(mine, theirs)


def test_flat_image_list_shared_by_placeholder_counts(ours, ref):
    """A flat image list is shared out over the prompts by their <image> counts (as transformers 5)."""
    images = [_image(30, 30, 9), _image(40, 30, 10), _image(30, 40, 11)]
    texts = ["<image><image>two", "<image>one"]
    kwargs = {"do_image_splitting": False, "padding": True}
    _same(ours(text=texts, images=images, **kwargs), ref(text=texts, images=images, return_tensors="pt", **kwargs))


# ----------------------------------------------------------------------------- apply_chat_template

CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "It is a gra"}]},
]
OWN_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}]{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}"
    "{% else %}<image>{% endif %}{% endfor %}\n{% endfor %}{% if tools %}tools={{ tools | length }}{% endif %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"add_generation_prompt": False},
        {"add_generation_prompt": True},
        {"continue_final_message": True},
        {"chat_template": OWN_TEMPLATE, "add_generation_prompt": True},
        {"chat_template": OWN_TEMPLATE, "add_generation_prompt": False, "tools": [{"name": "f"}, {"name": "g"}]},
        {"chat_template": OWN_TEMPLATE, "continue_final_message": True},
    ],
    ids=lambda k: ",".join(k),
)
def test_chat_rendering(ours, ref, kwargs):
    assert ours.apply_chat_template(CHAT, **kwargs) == ref.apply_chat_template(CHAT, **kwargs)


def test_continue_final_message_leaves_turn_open(ours):
    prompt = ours.apply_chat_template(CHAT, continue_final_message=True)
    assert prompt.endswith("Assistant: It is a gra")


def test_batched_chat_rendering(ours, ref):
    batch = [CHAT[:1], [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]]
    assert ours.apply_chat_template(batch, add_generation_prompt=True) == ref.apply_chat_template(
        batch, add_generation_prompt=True
    )


def test_tokenize_returns_ids(ours, ref):
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    theirs = ref.apply_chat_template(text_only, add_generation_prompt=True, tokenize=True)
    mine = ours.apply_chat_template(text_only, add_generation_prompt=True, tokenize=True, return_tensors=None)
    assert mine == theirs
    mine_pt = ours.apply_chat_template(text_only, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    assert torch.equal(mine_pt, torch.tensor(theirs))


def test_tokenize_return_dict_with_images(ours, ref):
    image = _image(60, 80, 12)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    theirs = ref.apply_chat_template(chat, processor_kwargs={"do_image_splitting": False}, **kwargs)
    mine = ours.apply_chat_template(chat, processor_kwargs={"do_image_splitting": False}, **kwargs)
    _same(mine, theirs)
    mine_flat = ours.apply_chat_template(chat, do_image_splitting=False, **kwargs)  # flat, as transformers' legacy
    _same(mine_flat, theirs)


# ----------------------------------------------------------------------------- deliberate differences


def test_difference_string_content_is_rendered_as_text(ours, ref):
    chat = [{"role": "user", "content": "Hello"}]
    assert "Hello" in ours.apply_chat_template(chat)
    assert "Hello" not in ref.apply_chat_template(chat, add_generation_prompt=True)


def test_difference_batches_are_padded_by_default(ours, ref):
    texts = ["a", "a b c d"]
    mine = ours(text=texts)
    assert mine["input_ids"].shape[0] == 2 and mine["attention_mask"][0, -1] == 0
    theirs = ref(text=texts)  # lists of different lengths: no padding by default
    assert len(theirs["input_ids"][0]) != len(theirs["input_ids"][1])
    _same(mine, ref(text=texts, padding=True, return_tensors="pt"))


def test_difference_defaults_return_tensors_and_generation_prompt(ours, ref):
    assert isinstance(ours(text="hi")["input_ids"], torch.Tensor)
    assert isinstance(ref(text="hi")["input_ids"], list)
    chat = CHAT[:1]
    assert ours.apply_chat_template(chat) == ref.apply_chat_template(chat, add_generation_prompt=True)
    assert ours.apply_chat_template(chat) != ref.apply_chat_template(chat)


# ----------------------------------------------------------------------------- coverage of transformers' keywords

#: Video keywords are handled on their own (the video processor); not this table's.
VIDEO = {"videos_kwargs"}


def test_every_transformers_call_keyword_is_in_the_table():
    from typing import get_type_hints

    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessorKwargs
    from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, TextKwargs

    from vlmkit.processor.options import CALL_KEYWORDS, GROUPS

    names = set()
    for typed in (TextKwargs, ImagesKwargs, Idefics3ImageProcessorKwargs, ProcessingKwargs):
        names |= set(get_type_hints(typed, include_extras=False))
    missing = sorted(names - set(CALL_KEYWORDS) - set(GROUPS) - VIDEO)
    assert not missing, missing


def test_every_transformers_chat_keyword_is_handled():
    import inspect
    from typing import get_type_hints

    from transformers.processing_utils import ProcessorChatTemplateKwargs

    from vlmkit.processor import Processor
    from vlmkit.processor.chat import REFUSED_CHAT, TEMPLATE_ONLY

    params = set(inspect.signature(Processor.apply_chat_template).parameters)
    names = set(get_type_hints(ProcessorChatTemplateKwargs)) | set(
        inspect.signature(transformers.ProcessorMixin.apply_chat_template).parameters
    )
    passed_on = {"self", "conversation", "kwargs", "return_tensors"}  # return_tensors goes to the processor call
    missing = sorted(names - params - set(REFUSED_CHAT) - set(TEMPLATE_ONLY) - passed_on)
    assert not missing, missing


def test_smolvlm2_chat_and_call_keywords():
    """SmolVLM2-500M's own template and tokenizer: the chat keywords and a few call keywords."""
    import json

    folder = published_folder("SmolVLM2-500M-Video-Instruct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its config.json has an out-of-vocab top-level pad_token_id
        v2 = load_processor(folder)
    try:
        from transformers.models.smolvlm import SmolVLMImageProcessorPil

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        image_processor = SmolVLMImageProcessorPil(**json.loads((folder / "preprocessor_config.json").read_text()))
        # SmolVLMProcessor needs num2words (video prompts); its image prompts are Idefics3's.
        ref2 = transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64,
                                              chat_template=v2.chat_template)  # fmt: skip
    except (ImportError, OSError, ValueError, TypeError) as exc:  # pragma: no cover - depends on transformers
        pytest.skip(f"transformers cannot build a SmolVLM2 processor from {folder}: {exc}")
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(v2.pad_token_id)
    for kwargs in ({"continue_final_message": True}, {"add_generation_prompt": True}, {"add_generation_prompt": False}):
        assert v2.apply_chat_template(CHAT, **kwargs) == ref2.apply_chat_template(CHAT, **kwargs)
    image = _image(100, 150, 13)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    kw = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    _same(v2.apply_chat_template(chat, processor_kwargs={"size": {"longest_edge": 1024}}, **kw),
          ref2.apply_chat_template(chat, processor_kwargs={"size": {"longest_edge": 1024}}, **kw))  # fmt: skip
    texts = ["<image>x", "a longer prompt without any image"]
    call = {"padding": True, "padding_side": "left", "do_image_splitting": False}
    _same(v2(text=texts, images=[[image], []], **call), ref2(text=texts, images=[[image], []], return_tensors="pt", **call))


def test_difference_a_keyword_that_changes_nothing_is_an_error(ours, ref):
    ref(text="hi", max_lenght=5)  # transformers logs a warning and goes on
    with pytest.raises(ProcessorError, match="did you mean 'max_length'"):
        ours(text="hi", max_lenght=5)


def test_batched_tokenize_is_padded(ours, ref):
    batch = [[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
             [{"role": "user", "content": [{"type": "text", "text": "A longer question, this one?"}]}]]  # fmt: skip
    kw = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    _same(ours.apply_chat_template(batch, **kw), ref.apply_chat_template(batch, processor_kwargs={"padding": True}, **kw))


def test_do_resize_false_still_splits_a_large_image(ours, ref):
    image = _image(700, 1100, 14)  # kept at its size: rounded up to 2 x 3 tiles of 512
    mine = ours(text="<image>", images=image, do_resize=False)
    _same(mine, ref(text="<image>", images=image, return_tensors="pt", do_resize=False))
    assert ours.image_cost(image, do_resize=False).tiles == (2, 3)
