"""``vlmkit export``: the folder loads in transformers (``AutoModelForImageTextToText``,
``AutoProcessor``) with the same inputs and logits as vlmkit, so vLLM / TGI can serve it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmkit.cli import main

from ._tiny_smolvlm import load_tiny, tiny_smolvlm_folder

transformers = pytest.importorskip("transformers")
TOL = 1e-4
#: transformers' default (torch) image backend vs its PIL one, which vlmkit matches exactly: up to
#: 3 uint8 levels (see tests/parity/test_processor_parity.py).
PIXEL_TOL = 0.025


@pytest.mark.slow  # transformers loads the folder twice (~4-9 s)
def test_export_loads_in_transformers_with_equal_logits(tmp_path, capsys):
    source, out = tiny_smolvlm_folder(), tmp_path / "export"
    assert main(["export", str(source), str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "max |diff|" in printed and "chat_template.json" in printed and "model.safetensors" in printed

    model, proc = load_tiny()
    hf_proc = transformers.AutoProcessor.from_pretrained(out)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    images = [Image.radial_gradient("L").convert("RGB").resize((150, 90)), Image.linear_gradient("L").convert("RGB")]
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                             {"type": "text", "text": "What differs?"}]}]  # fmt: skip
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert hf_proc.apply_chat_template(messages, add_generation_prompt=True) == text
    ours_in = proc(text=text, images=images)
    hf_in = hf_proc(text=text, images=images, return_tensors="pt")
    assert torch.equal(hf_in["input_ids"], ours_in["input_ids"])
    assert torch.equal(hf_in["pixel_attention_mask"].bool(), ours_in["pixel_attention_mask"].bool())
    assert (hf_in["pixel_values"] - ours_in["pixel_values"]).abs().max().item() <= PIXEL_TOL
    inputs = {k: hf_in[k] for k in ("input_ids", "pixel_values", "pixel_attention_mask")}
    with torch.no_grad():
        want, got = model(**inputs).logits, hf(**inputs).logits
    assert (got - want).abs().max().item() < TOL
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_export_refuses_a_used_folder_and_mismatched_processor_files(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    assert main(["export", str(tiny_smolvlm_folder()), str(used)]) == 1
    assert "not an empty folder" in capsys.readouterr().err and sorted(p.name for p in used.iterdir()) == ["keep.txt"]
    yaml = tmp_path / "swapped.yaml"
    yaml.write_text(
        "vision_tower: {name: navit, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
        " num_attention_heads: 2, image_size: 32, patch_size: 8}\n"
        "connector: {name: idefics3, scale_factor: 2}\n"
        "packer: {name: image_packer, image_token_id: 49190}\n"
        "backbone: {name: llama, vocab_size: 49280, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
        " num_attention_heads: 4, num_key_value_heads: 2}\n"
        "tokenizer: HuggingFaceTB/SmolVLM-256M-Instruct\n"
    )
    assert main(["export", str(yaml), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "512-px tiles of 64 visual tokens" in err and "32-px tiles and makes 4 tokens" in err
    assert not (tmp_path / "out").exists()
