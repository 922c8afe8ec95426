"""vlmkit.processor on the published SmolVLM files: cost preflight, guards, bad inputs, file checks."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.errors import ProcessorError, SpecError
from vlmkit.processor import ImageCost, PromptCost, SpecWarning, load_processor
from vlmkit.processor import processor as processor_module

from ..conftest import published_folder


@pytest.fixture(scope="module")
def folder():
    return published_folder("SmolVLM-256M-Instruct")


@pytest.fixture(scope="module")
def proc(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_processor(folder)


def _copy(folder, tmp_path, edits: dict[str, dict]) -> object:
    """A copy of ``folder`` with top-level keys of some JSON files replaced."""
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    for name, changes in edits.items():
        data = json.loads((copy / name).read_text())
        data.update(changes)
        (copy / name).write_text(json.dumps(data))
    return copy


def _load_quietly(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_processor(path, **kwargs)


# ----------------------------------------------------------------------------- loading and file checks


def test_reads_token_facts(proc):
    assert proc.image_seq_len == 64  # (512/16)^2 / 4^2
    assert proc.image_token == "<image>"
    assert proc.image_token_id == 49190 == proc.tokenizer.token_to_id("<image>")
    assert proc.eos_token_ids == [49279, 2]  # generation_config.json (= <end_of_utterance>), config.json's text eos
    assert proc.pad_token_id == 2 and proc.bos_token_id == 1
    assert proc.tokenizer.padding_side == "right"
    assert proc.settings.tile == 512 and proc.settings.longest_edge == 2048


def test_published_bos_eos_disagreement_is_logged_once_per_kind(folder, tmp_path, caplog):
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    caplog.set_level("INFO", logger="vlmkit.processor.checks")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)  # a resolution the user cannot act on is no warning
        load_processor(copy)
        load_processor(copy)
    messages = [r.getMessage() for r in caplog.records if r.name == "vlmkit.processor.checks"]
    bos = [m for m in messages if "on the bos token" in m]
    eos = [m for m in messages if "on the eos token" in m]
    assert len(bos) == 1 and len(eos) == 1 and len(messages) == 2, messages
    assert "generation_config.json bos_token_id = 0" in bos[0] and "uses 1" in bos[0] and str(copy) in bos[0]
    assert "config.json text_config.eos_token_id = 2" in eos[0] and "uses [49279, 2]" in eos[0]


def test_smolvlm2_folder_without_tokenizer_config(tmp_path, caplog):
    folder = published_folder("SmolVLM2-256M-Video-Instruct")
    copy = tmp_path / "v2"
    shutil.copytree(folder, copy)
    caplog.set_level("INFO", logger="vlmkit.processor.checks")
    v2 = load_processor(copy)
    assert any("pad token" in r.getMessage() and "128002" in r.getMessage() and "outside" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert v2.pad_token_id == 2 and v2.eos_token_ids == [49279] and v2.image_seq_len == 64
    assert v2.chat_template is None
    with pytest.raises(ProcessorError, match="no chat template"):
        v2.apply_chat_template([{"role": "user", "content": "hi"}])


def test_contradictory_processor_config_names_both_files(folder, tmp_path):
    copy = _copy(folder, tmp_path, {"processor_config.json": {"image_seq_len": 81}})
    with pytest.raises(SpecError) as info:
        _load_quietly(copy)
    message = str(info.value)
    assert "processor_config.json" in message and "config.json" in message
    assert "81" in message and "64" in message
    assert info.value.key_path == "image_seq_len"


def test_image_seq_len_override_must_match_config(folder):
    with pytest.raises(SpecError, match="image_seq_len=81 was passed"):
        _load_quietly(folder, image_seq_len=81)
    assert _load_quietly(folder, image_seq_len=64).image_seq_len == 64


def test_image_token_id_must_match_tokenizer(folder, tmp_path):
    copy = _copy(folder, tmp_path, {"config.json": {"image_token_id": 49189}})
    with pytest.raises(SpecError) as info:
        _load_quietly(copy)
    message = str(info.value)
    assert "config.json" in message and "tokenizer.json" in message and "49189" in message and "49190" in message


def test_image_token_id_must_be_in_vocabulary(folder, tmp_path):
    copy = _copy(folder, tmp_path, {"config.json": {"image_token_id": 60000}})
    with pytest.raises(SpecError, match="image_token_id 60000 is outside the vocabulary"):
        _load_quietly(copy)


def test_tile_size_must_match_vision_encoder(folder, tmp_path):
    copy = _copy(folder, tmp_path, {"preprocessor_config.json": {"max_image_size": {"longest_edge": 384}}})
    with pytest.raises(SpecError) as info:
        _load_quietly(copy)
    assert "preprocessor_config.json" in str(info.value) and "config.json" in str(info.value)


def test_bad_preprocessor_value_names_key(folder, tmp_path):
    copy = _copy(folder, tmp_path, {"preprocessor_config.json": {"size": {"shortest_edge": 10}}})
    with pytest.raises(SpecError) as info:
        _load_quietly(copy)
    assert info.value.key_path == "size.longest_edge"


# ----------------------------------------------------------------------------- cost preflight


@pytest.mark.parametrize(
    ("size", "kwargs", "tiles", "n_tiles", "resized"),
    [
        ((1, 1), {}, (4, 4), 17, (2048, 2048)),  # a tiny image is upscaled to 2048 px: 16 tiles + global
        ((480, 640), {}, (3, 4), 13, (1536, 2048)),
        ((200, 1000), {}, (1, 4), 5, (512, 2048)),
        ((1500, 200), {}, (4, 1), 5, (2048, 512)),
        ((480, 640), {"longest_edge": 1024}, (2, 2), 5, (1024, 1024)),
        ((480, 640), {"longest_edge": 512}, (0, 0), 1, (512, 512)),
        ((3000, 3000), {"do_image_splitting": False}, (0, 0), 1, (512, 512)),
    ],
)
def test_image_cost(proc, size, kwargs, tiles, n_tiles, resized):
    cost = proc.image_cost(size, **kwargs)
    assert cost.tiles == tiles and cost.n_tiles == n_tiles and cost.resized_size == resized
    assert cost.visual_tokens == n_tiles * 64


def test_small_image_costs_17_tiles(proc):
    image = Image.new("RGB", (3, 3))
    cost = proc.image_cost(image)
    assert isinstance(cost, ImageCost)
    assert (cost.n_tiles, cost.visual_tokens, cost.input_size) == (17, 17 * 64, (3, 3))
    assert cost == proc.image_cost((3, 3))
    assert proc.image_cost((2, 3)).visual_tokens == 13 * 64  # 3:2 -> 2048x1366 -> 3 x 4 tiles


def test_prompt_cost_equals_processed_length(proc):
    images = [Image.new("RGB", (640, 480)), Image.new("L", (40, 30))]
    prompt = "User:<image> and <image>, compare."
    cost = proc.prompt_cost(prompt, images, longest_edge=1024)
    assert isinstance(cost, PromptCost)
    assert cost.visual_tokens == sum(c.visual_tokens for c in cost.images) == (5 + 5) * 64
    ids = proc(text=prompt, images=images, longest_edge=1024)["input_ids"]
    assert cost.total_tokens == ids.shape[1] == cost.text_tokens + cost.visual_tokens
    assert int((ids == proc.image_token_id).sum()) == cost.visual_tokens
    costs = proc.prompt_cost([prompt, "no image"], [images, []])
    assert [type(c) for c in costs] == [PromptCost, PromptCost] and costs[1].visual_tokens == 0


def test_tokenize_gives_the_text_fields_without_pixel_work(proc, monkeypatch):
    images = [Image.new("RGB", (640, 480)), Image.new("L", (40, 30))]
    prompts = ["User:<image> and <image>, compare.", "no image"]
    full = proc(text=prompts, images=[images, []], longest_edge=1024)

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixel work started")

    monkeypatch.setattr(processor_module, "encode_image", no_pixels)
    monkeypatch.setattr(processor_module, "to_rgb", no_pixels)
    text_only = proc.tokenize(prompts, [images, []], longest_edge=1024)
    assert sorted(text_only) == ["attention_mask", "input_ids"]
    assert torch.equal(text_only["input_ids"], full["input_ids"])
    assert torch.equal(text_only["attention_mask"], full["attention_mask"])
    with pytest.raises(ProcessorError, match="did you mean 'longest_edge'"):
        proc.tokenize(prompts[0], images, longest_edg=1024)


def test_budget_guard_raises_before_pixel_work(proc, monkeypatch):
    def no_pixels(*args, **kwargs):
        raise AssertionError("pixel work started")

    monkeypatch.setattr(processor_module, "encode_image", no_pixels)
    monkeypatch.setattr(processor_module, "to_rgb", no_pixels)
    image = Image.new("RGB", (1, 1))
    with pytest.raises(ProcessorError) as info:
        proc(text="<image>", images=image, max_visual_tokens=500)
    message = str(info.value)
    for part in ("image 0 of sample 0", "1088", "max_visual_tokens=500", "longest_edge=", "do_image_splitting=False"):
        assert part in message, part


def test_budget_guard_from_constructor_and_per_call_override(folder):
    guarded = _load_quietly(folder, max_visual_tokens=320)
    image = Image.new("RGB", (640, 480))
    with pytest.raises(ProcessorError, match="costs 832 visual tokens"):
        guarded(text="<image>", images=image)
    assert guarded(text="<image>", images=image, longest_edge=1024)["pixel_values"].shape[1] == 5
    assert guarded(text="<image>", images=image, max_visual_tokens=1088)["pixel_values"].shape[1] == 13
    with pytest.raises(ProcessorError, match="at least that"):
        guarded(text="<image>", images=image, max_visual_tokens=10)


def test_grid_beyond_tile_tokens_is_refused(proc):
    with pytest.raises(ProcessorError, match="tile tokens up to <row_6_col_6>"):
        proc.image_cost((4000, 4000), longest_edge=4096)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (Image.new("RGB", (0, 5)), "empty"),
        (Image.new("I;16", (8, 8)), "mode 'I;16'"),
        (Image.new("F", (8, 8)), "mode 'F'"),
        (np.zeros((8, 8, 3), dtype=np.float32), "dtype float32"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "channels"),
        ("cat.png", "expected a PIL image"),
    ],
    ids=["zero-size", "16-bit", "float-mode", "float-array", "two-channels", "path-string"],
)
def test_bad_images(proc, image, match):
    with pytest.raises(ProcessorError, match=match):
        proc(text="<image>", images=[[image]])


def test_array_and_tensor_inputs_match_pil(proc):
    rgb = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    expected = proc(text="<image>", images=Image.fromarray(rgb), longest_edge=512)
    for image in (rgb, torch.from_numpy(rgb).permute(2, 0, 1)):
        out = proc(text="<image>", images=image, longest_edge=512)
        assert torch.equal(out["pixel_values"], expected["pixel_values"])


@pytest.mark.parametrize(
    ("text", "images", "match"),
    [
        ("<image><image>", [[Image.new("RGB", (4, 4))]], "sample 0: the prompt has 2 <image> placeholder"),
        (["no image", "<image>"], [[Image.new("RGB", (4, 4))], []], "sample 0: the prompt has 0 <image>"),
        (["<image>", "<image><image>"], [Image.new("RGB", (4, 4))] * 2, r"2 image\(s\) were given .* 3 <image>"),
        ("plain text", Image.new("RGB", (4, 4)), "has 0 <image> placeholder"),
        (["a", "b"], [[Image.new("RGB", (4, 4))]], "2 prompt"),
        ("<image>", "cat.png", "images is a str"),
    ],
)
def test_mismatched_placeholders(proc, text, images, match):
    with pytest.raises(ProcessorError, match=match):
        proc(text=text, images=images)


def test_bad_options(proc):
    with pytest.raises(ProcessorError, match="longest_edge"):
        proc(text="<image>", images=Image.new("RGB", (4, 4)), longest_edge=0)
    with pytest.raises(ProcessorError, match="padding"):
        proc(text="hi", padding="maximal")
    with pytest.raises(ProcessorError, match="return_tensors"):
        proc(text="hi", return_tensors="tf")
    with pytest.raises(ProcessorError, match="nothing to process"):
        proc()


# ----------------------------------------------------------------------------- outputs


def test_output_layout_and_padding(proc):
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    out = proc(text=["<image>x", "longer text without an image"], images=[[image], []], do_image_splitting=False)
    assert out.input_ids.shape == out.attention_mask.shape and out.input_ids.dtype == torch.long
    assert out.pixel_values.shape == (2, 1, 3, 512, 512) and out.pixel_attention_mask.shape == (2, 1, 512, 512)
    assert out.pixel_attention_mask[0].all() and not out.pixel_attention_mask[1].any()
    assert torch.allclose(out.pixel_values[0, 0, 0], torch.ones(512, 512))  # red 255 -> +1 after mean/std 0.5
    assert torch.allclose(out.pixel_values[0, 0, 1], -torch.ones(512, 512))
    lengths = out.attention_mask.sum(1)
    short = int(lengths.argmin())
    assert (out.input_ids[short, lengths[short] :] == proc.pad_token_id).all()  # right padding
    cast = out.to(dtype=torch.bfloat16)
    assert cast.pixel_values.dtype == torch.bfloat16 and cast.input_ids.dtype == torch.long


def test_unpadded_lists_and_ragged_tensors(proc):
    out = proc(text=["a", "a b c d"], padding=False, return_tensors=None)
    assert [len(x) for x in out["input_ids"]] != [1, 1] and out["attention_mask"][0] == [1] * len(out["input_ids"][0])
    with pytest.raises(ProcessorError, match="cannot form one tensor"):
        proc(text=["a", "a b c d"], padding=False)


def test_images_only(proc):
    out = proc(images=[Image.new("RGB", (10, 10)), Image.new("RGB", (700, 10))])
    assert set(out) == {"pixel_values", "pixel_attention_mask"}
    assert out.pixel_values.shape == (1, 17 + 5, 3, 512, 512)


def test_transparency_is_composited_on_white(proc):
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = proc(text="<image>", images=clear, do_image_splitting=False)
    assert torch.allclose(out.pixel_values, torch.ones_like(out.pixel_values))


def test_chat_template_and_decode(proc):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = proc.apply_chat_template(messages)
    assert prompt == "<|im_start|>User:<image>What is it?<end_of_utterance>\nAssistant:"
    assert proc.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == (
        "<|im_start|>User: hi<end_of_utterance>\n"
    )
    assert proc.apply_chat_template([messages, messages]) == [prompt, prompt]
    ids = proc(text=prompt, images=Image.new("RGB", (5, 5)), do_image_splitting=False).input_ids
    assert proc.decode(ids[0], skip_special_tokens=True) == "User:What is it?\nAssistant:"
    assert proc.batch_decode(ids)[0].startswith("<|im_start|>User:<fake_token_around_image><global-img><image>")


def test_bundled_repo_id_loads_offline():
    """conftest sets HF_HUB_OFFLINE=1: a bundled repo id falls back to vlmkit's copy of its files."""
    bundled = _load_quietly("HuggingFaceTB/SmolVLM-256M-Instruct")
    assert bundled.image_seq_len == 64 and bundled.image_token_id == 49190
