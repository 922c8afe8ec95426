"""Real text weights (SmolLM2-135M-Instruct in the SmolVLM-256M layout): vlmkit vs transformers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlmkit

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(smolvlm_real_folder):
    hf = transformers.AutoModelForImageTextToText.from_pretrained(smolvlm_real_folder, dtype=torch.float32).eval()
    ours = vlmkit.build_from_hf(smolvlm_real_folder)
    processor = transformers.AutoProcessor.from_pretrained(smolvlm_real_folder)
    return hf, ours, processor


def _chat(processor, with_image: bool) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": "What is the capital of France?"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_text_chat_logits_match(models):
    hf, ours, processor = models
    inputs = processor(text=[_chat(processor, False)], return_tensors="pt")
    with torch.no_grad():
        want = hf(**inputs).logits
        got = ours(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, f"max abs diff {diff:.2e}"
    assert int(got[0, -1].argmax()) == int(want[0, -1].argmax())


def test_image_chat_logits_match(models):
    hf, ours, processor = models
    image = Image.linear_gradient("L").convert("RGB").resize((300, 200))
    inputs = processor(text=[_chat(processor, True)], images=[[image]], return_tensors="pt", do_image_splitting=False)
    with torch.no_grad():
        want = hf(**inputs).logits
        got = ours(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}).logits
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, f"max abs diff {diff:.2e}"


def test_inspect_reports_weights_loaded(smolvlm_real_folder, capsys):
    from vlmkit.cli import main

    assert main(["inspect", str(smolvlm_real_folder)]) == 0
    out = capsys.readouterr().out
    assert "nothing missing" in out
    assert "471 tensors loaded" in out
    assert "512x512 -> 1024 patches x 768 -> 64 tokens x 12288 -> 64 tokens x 576" in out
