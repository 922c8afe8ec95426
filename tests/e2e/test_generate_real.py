"""Generation on real weights: the SmolVLM-256M folder with SmolLM2-135M text weights.

vlmkit's greedy tokens must equal transformers' ``generate`` on the same folder (same inputs from
vlmkit's processor, same stop ids) for a text-only chat prompt, an image prompt and a left-padded
batch of two; and the model must know the capital of France. Kept short: few new tokens, small
images without splitting (one 512x512 tile each).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import vlmkit  # noqa: E402
from vlmkit import generation  # noqa: E402
from vlmkit.generation import default_pad_id, default_stop_ids, stream  # noqa: E402

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
NEW = 8


@pytest.fixture(scope="module")
def ours(smolvlm_real_folder: Path):
    return vlmkit.build_from_hf(smolvlm_real_folder)


@pytest.fixture(scope="module")
def hf(smolvlm_real_folder: Path):
    return transformers.AutoModelForImageTextToText.from_pretrained(smolvlm_real_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(smolvlm_real_folder: Path):
    import warnings

    from vlmkit.processor import load_processor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the folder's files disagree on bos/eos (SpecWarning), by design
        return load_processor(smolvlm_real_folder)


def _gradient(width=96, height=64):
    from PIL import Image

    x = torch.linspace(0, 255, width)[None, :].expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    rgb = torch.stack([x, y, 255 - x], -1).round().to(torch.uint8).numpy()
    return Image.fromarray(rgb, "RGB")


def _chat(processor, text: str, images: int = 0) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _same_as_transformers(ours, hf, batch, new=NEW):
    stops, pad = default_stop_ids(ours), default_pad_id(ours)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    with torch.no_grad():
        want = hf.generate(**inputs, do_sample=False, max_new_tokens=new, eos_token_id=stops, pad_token_id=pad)
    got = ours.generate(inputs.pop("input_ids"), max_new_tokens=new, **inputs)
    T = batch["input_ids"].shape[1]
    assert torch.equal(got, want), f"\nvlmkit {got[:, T:].tolist()}\nhf     {want[:, T:].tolist()}"
    return got


def test_default_stops_include_the_backbones_im_end(ours, processor):
    stops = default_stop_ids(ours)
    assert set(processor.eos_token_ids) <= set(stops)  # generation_config's <end_of_utterance>
    assert processor.tokenizer.token_to_id("<|im_end|>") in stops  # what SmolLM2 ends answers with


def test_text_chat_matches_transformers_and_knows_paris(ours, hf, processor):
    batch = processor(text=_chat(processor, QUESTION))
    got = _same_as_transformers(ours, hf, batch, new=12)
    answer = processor.decode(got[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert ours.last_generation.path == generation.PATH_DECODE_LOOP


def test_streamed_answer_is_the_generated_text(ours, processor):
    batch = processor(text=_chat(processor, QUESTION))
    text = "".join(stream(ours, batch["input_ids"], processor=processor, max_new_tokens=12))
    assert "Paris" in text and "<|im_end|>" not in text


def test_image_prompt_matches_transformers(ours, hf, processor):
    batch = processor(text=_chat(processor, "Describe this image.", images=1), images=[_gradient()], do_image_splitting=False)
    assert batch["pixel_values"].shape[1] == 1
    _same_as_transformers(ours, hf, batch)


def test_left_padded_batch_matches_transformers(ours, hf, processor):
    prompts = [_chat(processor, "What colors are in this picture?", images=1), _chat(processor, QUESTION)]
    processor.tokenizer.padding_side = "left"
    try:
        batch = processor(text=prompts, images=[[_gradient(80, 80)], []], do_image_splitting=False)
    finally:
        processor.tokenizer.padding_side = "right"
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2 and (mask[1] == 0).any() and bool(mask[0].all()), "row 1 must be left-padded"
    got = _same_as_transformers(ours, hf, batch)
    answer = processor.decode(got[1, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cli_streams_the_answer_and_prints_timings(smolvlm_real_folder: Path, capsys, tmp_path):
    from vlmkit.cli import main

    assert main(["generate", str(smolvlm_real_folder), "--prompt", QUESTION, "-n", "12"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and "tokens/s" in err and "path decode_loop" in err
    image = tmp_path / "gradient.png"
    _gradient(64, 48).save(image)
    code = main(["generate", str(smolvlm_real_folder), "--prompt", "Describe it.", "-n", "2", "--image", str(image), "--no-split"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "image 1" in err and "64 visual tokens" in err  # the token-cost preflight
    assert main(["generate", str(smolvlm_real_folder), "--prompt", "x", "--top-p", "0"]) == 1
    assert "--top-p" in capsys.readouterr().err
    assert main(["generate", str(smolvlm_real_folder), "--prompt", QUESTION, "-n", "12", "--int8"]) == 0
    out, err = capsys.readouterr()
    assert "int8: w8" in err and " layers in " in err and "tokens/s" in err  # w8a8 or w8, whichever fits this CPU
    assert out.strip()  # an answer (int8 is approximate: not asserted token for token)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is optional and not installed")
def test_llama_cpp_rows_on_the_real_weights(smolvlm_real_folder, tmp_path) -> None:  # noqa: ANN001
    """The bench's llama.cpp section on the folder made from the GGUF: every kind alternated with
    its vlmkit side, both continuing prompts that hold an id llama.cpp's vocabulary lacks
    (SmolVLM's <end_of_utterance>: dropped for both sides); float32 vs F32 agree on most."""
    import torch

    from vlmkit.bench.llama_cpp import agreement_rows, comparison_rows, llama_cpp_section
    from vlmkit.bench.prompts import agreement_prompts, make_prompts
    from vlmkit.bench.sides import VlmkitSide

    fp32 = VlmkitSide(smolvlm_real_folder)
    fp32.load()
    prompt = make_prompts(smolvlm_real_folder, [0])[0]
    greedy = [ids[0].tolist() for ids in agreement_prompts(smolvlm_real_folder)[:4]]
    assert any(t >= 49152 for t in greedy[0])  # the template's <end_of_utterance>
    with torch.inference_mode():
        section = llama_cpp_section(smolvlm_real_folder, fp32, prompt, 2, 4, 1, tmp_path, 600.0, greedy, 4)
    assert all("error" not in k for k in section["kinds"].values()), section["kinds"]
    result = {"llama_cpp": section}
    assert {r["key"] for r in comparison_rows(result)} >= {"decode_F32", "decode_Q8_0", "decode_Q4_1"}
    agree = {r["key"]: r for r in agreement_rows(result)}
    assert agree["agree_F32"]["llama.cpp"] >= 0.5 and agree["agree_Q8_0"]["vlmkit"] is not None
    assert section["kinds"]["Q8_0"]["vlmkit_scheme"] in ("w8", "w8a8") and section["prompt_len"] < prompt.length
