"""The llava processor: ``vlmkit.load_processor`` on a folder saved by transformers' ``LlavaProcessor``
(CLIP image processor, the bundled SmolVLM tokenizer with its ``<image>`` token) gives the same
input_ids, attention_mask and pixel_values, and with a tiny random LlavaForConditionalGeneration
the same greedy tokens end to end.

transformers' ``pixel_values`` are ``(N_total, 3, H, W)``; vlmkit's are ``(B, N, 3, H, W)`` (zero
padded): the comparison concatenates each prompt's real images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
    LlavaProcessor,
)  # fmt: skip

import vlmkit  # noqa: E402
from vlmkit.errors import ProcessorError, SpecError  # noqa: E402

TOKENIZER = Path(vlmkit.__file__).parent / "data" / "hf-configs" / "SmolVLM-256M-Instruct"
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=4, hidden_act="quick_gelu")  # fmt: skip
TEXT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048)  # fmt: skip
CLIP = dict(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
#: (height, width) of the test images: landscape, portrait, square, smaller than the crop.
SIZES = [(20, 30), (41, 17), (16, 16), (9, 13)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def save_folder(path, tokenizer, *, strategy="default", extra=1, clip=None, model=False, **processor):
    """A llava checkpoint folder: config.json (and random weights with ``model``) + LlavaProcessor files."""
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION).to_dict(),
                         text_config=LlamaConfig(vocab_size=len(tokenizer), **TEXT).to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy=strategy)  # fmt: skip
    if model:
        hf = LlavaForConditionalGeneration(config).eval()
        with torch.no_grad():  # larger weights than the 0.02 init: clear argmax gaps
            for p in hf.parameters():
                p.mul_(4.0 if p.dim() > 1 else 1.0)
        hf.save_pretrained(path)
    else:
        hf = None
        config.save_pretrained(path)
    ref = LlavaProcessor(image_processor=CLIPImageProcessorPil(**(clip or CLIP)), tokenizer=tokenizer, patch_size=4,
                         vision_feature_select_strategy=strategy, num_additional_image_tokens=extra,
                         chat_template=tokenizer.chat_template, **processor)  # fmt: skip
    ref.save_pretrained(path)
    return ref, hf


def assert_same(ours, ref, texts, nested):
    flat = [img for row in nested for img in row]
    want = ref(text=texts, images=flat or None, return_tensors="pt", padding=True)
    got = ours(text=texts, images=nested)
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["attention_mask"].tolist() == want["attention_mask"].tolist()
    if flat:
        pv = got["pixel_values"]
        ours_flat = torch.cat([pv[b, : len(row)] for b, row in enumerate(nested)])
        assert ours_flat.shape == want["pixel_values"].shape
        assert torch.equal(ours_flat, want["pixel_values"])
        assert got["pixel_attention_mask"].sum(dim=(2, 3)).gt(0).sum(dim=1).tolist() == [len(r) for r in nested]
    return got


CASES = [("default", 1), ("default", 0), ("full", 1), ("full", 0)]


@pytest.mark.parametrize(("strategy", "extra"), CASES)
def test_ids_and_pixels_match_llava_processor(tmp_path, tokenizer, strategy, extra):
    ref, _ = save_folder(tmp_path, tokenizer, strategy=strategy, extra=extra)
    ours = vlmkit.load_processor(tmp_path)
    imgs = images()
    expected = 16 + extra - (strategy == "default")
    assert ours.image_seq_len == expected and ours.image_cost(imgs[0]).visual_tokens == expected
    got = assert_same(ours, ref, ["Look: <image> what is it?"], [[imgs[0]]])
    assert got["input_ids"].eq(ours.image_token_id).sum().item() == expected
    assert_same(ours, ref, ["<image> then <image>, compare"], [[imgs[1], imgs[2]]])
    batch = ["One <image>.", "Two <image><image> and then some more words"]  # different lengths: padding
    got = assert_same(ours, ref, batch, [[imgs[3]], [imgs[0], imgs[1]]])
    assert got["pixel_values"].shape == (2, 2, 3, 16, 16) and got["pixel_values"][0, 1].eq(0).all()
    assert_same(ours, ref, ["No image here.", "An image <image>"], [[], [imgs[2]]])


def test_non_square_crop_and_no_crop_follow_the_patch_grid(tmp_path, tokenizer):
    ref, _ = save_folder(tmp_path / "crop", tokenizer, clip=dict(size={"shortest_edge": 12}, crop_size={"height": 12, "width": 20}))
    ours = vlmkit.load_processor(tmp_path / "crop")
    assert ours.image_seq_len == 3 * 5
    assert_same(ours, ref, ["<image> and <image>"], [images()[:2]])
    ref, _ = save_folder(tmp_path / "exact", tokenizer, clip=dict(size={"height": 8, "width": 24}, do_center_crop=False))
    ours = vlmkit.load_processor(tmp_path / "exact")
    assert ours.image_seq_len == 2 * 6
    assert_same(ours, ref, ["<image> and <image>"], [images()[2:]])


def test_published_layout_with_preprocessor_config_json(tmp_path, tokenizer):
    """llava-hf files: the image processor in preprocessor_config.json, not nested in processor_config.json."""
    ref, _ = save_folder(tmp_path, tokenizer)
    proc = json.loads((tmp_path / "processor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(proc.pop("image_processor")))
    (tmp_path / "processor_config.json").write_text(json.dumps(proc))
    assert_same(vlmkit.load_processor(tmp_path), ref, ["<image> hi", "x <image> <image>"], [[images()[0]], images()[1:3]])
    changed = {**json.loads((tmp_path / "preprocessor_config.json").read_text()), "crop_size": {"height": 8, "width": 8}}
    proc["image_processor"] = changed
    (tmp_path / "processor_config.json").write_text(json.dumps(proc))
    with pytest.raises(SpecError, match="ambiguous"):
        vlmkit.load_processor(tmp_path)


def test_chat_template_matches(tmp_path, tokenizer):
    ref, _ = save_folder(tmp_path, tokenizer)
    ours = vlmkit.load_processor(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"},
                                             {"type": "image"}]}]  # fmt: skip
    text = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True)
    assert_same(ours, ref, [text], [images()[:2]])


@pytest.mark.parametrize(
    "options",
    [{"do_image_splitting": False}, {"longest_edge": 32}, {"images_kwargs": {"do_center_crop": False}},
     {"max_image_size": {"longest_edge": 16}}, {"image_seq_len": 16}],
)  # fmt: skip
def test_tiling_keywords_are_refused_by_name(tmp_path, tokenizer, options):
    save_folder(tmp_path, tokenizer)
    ours = vlmkit.load_processor(tmp_path)
    name = next(iter(options["images_kwargs"])) if "images_kwargs" in options else next(iter(options))
    with pytest.raises(ProcessorError, match=name) as err:
        ours(text="<image>", images=[images()[0]], **options)
    assert "do_normalize" in (err.value.hint or "")  # names what it does take
    with pytest.raises(ProcessorError, match=name):
        ours.image_cost((20, 20), **options)


def test_call_keywords_it_takes_match_the_reference(tmp_path, tokenizer):
    ref, _ = save_folder(tmp_path, tokenizer)
    ours = vlmkit.load_processor(tmp_path)
    kw = dict(do_normalize=False, image_mean=[0.5, 0.5, 0.5], resample=2)
    want = ref(text="<image>", images=[images()[1]], return_tensors="pt", **kw)["pixel_values"]
    assert torch.equal(ours(text="<image>", images=[images()[1]], **kw)["pixel_values"][0], want)


def test_file_contradictions_are_spec_errors(tmp_path, tokenizer):
    save_folder(tmp_path, tokenizer, strategy="full")
    proc = json.loads((tmp_path / "processor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({**proc, "patch_size": 8}))
    with pytest.raises(SpecError, match="patch_size=8") as err:
        vlmkit.load_processor(tmp_path)
    assert "vision_config.patch_size" in str(err.value)
    (tmp_path / "processor_config.json").write_text(json.dumps({**proc, "vision_feature_select_strategy": "default"}))
    with pytest.raises(SpecError, match="vision_feature_select_strategy"):
        vlmkit.load_processor(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps(proc))
    spec = vlmkit.build_from_hf(tmp_path, load_weights=False).spec
    assert vlmkit.load_processor(tmp_path, spec=spec).image_seq_len == 17  # a spec that fits the files is taken
    tower = spec.vision_tower.model_copy(update={"params": spec.vision_tower.params.model_copy(
        update={"vision_feature_select_strategy": "default"})})  # fmt: skip
    with pytest.raises(ProcessorError, match="spec= cannot drive .* 16 visual tokens, the files make 16x16 px images of 17"):
        vlmkit.load_processor(tmp_path, spec=spec.model_copy(update={"vision_tower": tower}))


def test_processor_and_model_generate_the_same_tokens(tmp_path, tokenizer):
    ref, hf = save_folder(tmp_path, tokenizer, model=True)
    ours_proc, ours = vlmkit.load_processor(tmp_path), vlmkit.build_from_hf(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"}, {"type": "image"}]}]
    imgs = images()[:2]
    ours_in = ours_proc.apply_chat_template(messages, images=[imgs], tokenize=True, return_dict=True)
    hf_in = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt", images=imgs)  # fmt: skip
    assert ours_in["input_ids"].tolist() == hf_in["input_ids"].tolist()
    got = ours.generate(ours_in["input_ids"], attention_mask=ours_in["attention_mask"],
                        pixel_values=ours_in["pixel_values"], pixel_attention_mask=ours_in["pixel_attention_mask"],
                        max_new_tokens=8, eos_token_id=[], pad_token_id=0)  # fmt: skip
    with torch.no_grad():
        want = hf.generate(**hf_in, do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    assert got.tolist() == want.tolist()


def test_prompt_cost_and_visual_token_budget(tmp_path, tokenizer):
    save_folder(tmp_path, tokenizer)
    ours = vlmkit.load_processor(tmp_path)
    prompt, imgs = "A <image> and <image> here", images()[:2]
    cost = ours.prompt_cost(prompt, [imgs])
    ids = ours(text=prompt, images=[imgs])["input_ids"]
    assert cost.total_tokens == ids.shape[1] and cost.visual_tokens == 2 * 16
    with pytest.raises(ProcessorError, match="over max_visual_tokens=10"):
        ours(text=prompt, images=[imgs], max_visual_tokens=10)
    capped = vlmkit.load_processor(tmp_path, max_visual_tokens=16)
    assert capped(text="<image>", images=[imgs[0]])["input_ids"].shape[1] >= 16


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"num_additional_image_tokens": -1}, "num_additional_image_tokens", "integer >= 0"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy", "one of"),
        ({"patch_size": "4"}, "patch_size", "integer >= 1"),
        ({"image_token": ""}, "image_token", "placeholder"),
        ({"image_processor": {"size": {"longest_edge": 16}}}, "size", "shortest_edge"),
        ({"image_processor": None}, None, "no image processor settings"),
    ],
)
def test_bad_processor_config_values_name_the_key(tmp_path, tokenizer, change, key, message):
    save_folder(tmp_path, tokenizer)
    proc = {**json.loads((tmp_path / "processor_config.json").read_text()), **change}
    (tmp_path / "processor_config.json").write_text(json.dumps({k: v for k, v in proc.items() if v is not None}))
    with pytest.raises(SpecError, match=message) as err:
        vlmkit.load_processor(tmp_path)
    assert err.value.key_path == key or (key is None and err.value.key_path is None)


def test_a_left_padded_batch_generates_the_same_tokens(tmp_path, tokenizer):
    ref, hf = save_folder(tmp_path, tokenizer, model=True)
    ours_proc, ours = vlmkit.load_processor(tmp_path), vlmkit.build_from_hf(tmp_path)
    texts, imgs = ["Describe <image> briefly please, in a few words", "<image> vs <image>?"], images()
    nested = [[imgs[0]], [imgs[1], imgs[3]]]
    ours_in = ours_proc(text=texts, images=nested, padding_side="left")
    hf_in = ref(text=texts, images=[imgs[0], imgs[1], imgs[3]], return_tensors="pt", padding=True, padding_side="left")
    assert ours_in["input_ids"].tolist() == hf_in["input_ids"].tolist()
    assert ours_in["attention_mask"][0, 0].item() == 0  # the shorter prompt is padded on the left
    got = ours.generate(ours_in["input_ids"], attention_mask=ours_in["attention_mask"],
                        pixel_values=ours_in["pixel_values"], pixel_attention_mask=ours_in["pixel_attention_mask"],
                        max_new_tokens=6, eos_token_id=[], pad_token_id=0)  # fmt: skip
    with torch.no_grad():
        want = hf.generate(**hf_in, do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert got.tolist() == want.tolist()


def test_export_keeps_the_processor_files(tmp_path, tokenizer):
    """`vlmkit export` of a llava checkpoint checks its processor files (tokens per image against the
    model's) and copies them: transformers' processor of the exported folder gives the same ids."""
    from vlmkit.serve.export import export_folder

    save_folder(tmp_path / "src", tokenizer, model=True)
    model = vlmkit.build_from_hf(tmp_path / "src")
    out = export_folder(model, str(tmp_path / "src"), tmp_path / "out")
    ref = transformers.AutoProcessor.from_pretrained(out, use_fast=False)  # the Pillow backend, as vlmkit
    assert_same(vlmkit.load_processor(out), ref, ["<image> and <image>"], [images()[:2]])
    save_folder(tmp_path / "bad", tokenizer, model=True, extra=0)  # 15 tokens per image; the model takes 16
    with pytest.raises(vlmkit.errors.VlmkitError, match="15 visual tokens"):
        export_folder(vlmkit.build_from_hf(tmp_path / "bad"), str(tmp_path / "bad"), tmp_path / "out2")


def test_missing_processor_values_come_from_config_json(tmp_path, tokenizer):
    ref, _ = save_folder(tmp_path, tokenizer, strategy="full")
    proc = json.loads((tmp_path / "processor_config.json").read_text())
    slim = {k: v for k, v in proc.items() if k not in ("patch_size", "vision_feature_select_strategy")}
    (tmp_path / "processor_config.json").write_text(json.dumps(slim))
    ours = vlmkit.load_processor(tmp_path)
    assert ours.image_seq_len == 16 + 1  # config.json's patch size 4 and strategy "full" (class token kept)
    assert_same(ours, ref, ["<image>!"], [[images()[0]]])
