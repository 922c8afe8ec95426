"""build_from_hf(load_weights=False) has exactly transformers' parameter count for each published config."""

from __future__ import annotations

import json

import pytest
import torch

import vlmkit

transformers = pytest.importorskip("transformers")


def _hf_count(folder) -> int:
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_parameter_count_matches_transformers(published):
    name, folder = published
    model = vlmkit.build_from_hf(folder, load_weights=False)
    ours = sum(p.numel() for p in model.parameters())
    assert ours == _hf_count(folder), name
    assert model.dtype == torch.float32
    config = json.loads((folder / "config.json").read_text())
    assert model.packer.image_token_id == config["image_token_id"]
    assert model.untrained_parameters()  # nothing was loaded: everything is fresh
