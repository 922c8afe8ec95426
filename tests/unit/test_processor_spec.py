"""A processor driven by an assembled model's spec: another tower gets the right tiles and tokens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlmkit

from ..conftest import BUNDLED, REPO

TOKENIZER = str(BUNDLED / "SmolVLM-256M-Instruct")


def _tiny_spec(image_size=48, patch=8, scale=2):
    return vlmkit.spec.validate_spec({
        "vision_tower": {"name": "siglip", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "image_size": image_size, "patch_size": patch},
        "connector": {"name": "idefics3", "scale_factor": scale},
        "packer": {"name": "image_packer", "image_token_id": 49190},
        "backbone": {"name": "llama", "vocab_size": 49280, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2},
        "tokenizer": TOKENIZER,
    })


def test_spec_sets_tile_and_tokens():
    spec = _tiny_spec()
    proc = vlmkit.load_processor(spec=spec)
    assert proc.image_seq_len == 9  # (48 / 8 / 2)^2
    image = Image.new("RGB", (100, 60), (200, 10, 10))
    out = proc(text=["<image>What color?"], images=[[image]], return_tensors="pt")
    assert out["pixel_values"].shape[-2:] == (48, 48)
    n_img = out["pixel_values"].shape[1]
    assert int((out["input_ids"] == 49190).sum()) == 9 * n_img
    model = vlmkit.build(spec, load_weights=False)
    ids = model.generate(out["input_ids"], attention_mask=out["attention_mask"], pixel_values=out["pixel_values"],
                         pixel_attention_mask=out["pixel_attention_mask"], max_new_tokens=3)
    assert ids.shape[1] == out["input_ids"].shape[1] + 3


def test_yaml_path_as_source_uses_its_tokenizer():
    proc = vlmkit.load_processor(REPO / "configs" / "siglip-so400m-smolvlm-256m-text.yaml")
    assert proc.image_seq_len == 81
    cost = proc.image_cost((384, 384))
    assert cost.visual_tokens == cost.n_tiles * 81


def test_spec_without_tokenizer_is_an_error():
    spec = _tiny_spec().model_copy(update={"tokenizer": None})
    with pytest.raises(vlmkit.errors.ProcessorError, match="tokenizer"):
        vlmkit.load_processor(spec=spec)
