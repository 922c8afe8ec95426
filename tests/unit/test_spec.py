"""spec_from_hf reads every model number from the published files, and rejects bad ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import vlmkit
from vlmkit.errors import SpecError

from ..conftest import published_folder

# Expected numbers, read by hand from the published config.json files (see shared/hf-configs).
EXPECTED = {
    "SmolVLM-256M-Instruct": dict(vd=768, td=576, layers=30, heads=9, kv=3, scale=4, tokens=64, tie=False),
    "SmolVLM-500M-Instruct": dict(vd=768, td=960, layers=32, heads=15, kv=5, scale=4, tokens=64, tie=False),
    "SmolVLM2-256M-Video-Instruct": dict(vd=768, td=576, layers=30, heads=9, kv=3, scale=4, tokens=64, tie=False),
    "SmolVLM2-500M-Video-Instruct": dict(vd=768, td=960, layers=32, heads=15, kv=5, scale=4, tokens=64, tie=False),
}


def test_spec_reads_published_numbers(published):
    name, folder = published
    config = json.loads((folder / "config.json").read_text())
    spec = vlmkit.spec_from_hf(folder)
    want = EXPECTED[name]
    v, c, p, b = (spec.vision_tower.params, spec.connector.params, spec.packer.params, spec.backbone.params)
    assert spec.vision_tower.name == "navit" and spec.backbone.name == "llama"
    assert v.hidden_size == want["vd"] == config["vision_config"]["hidden_size"]
    assert v.image_size == config["vision_config"]["image_size"] and v.patch_size == config["vision_config"]["patch_size"]
    assert c.scale_factor == want["scale"] == config["scale_factor"]
    assert p.image_token_id == config["image_token_id"]
    assert p.tokens_per_image == want["tokens"]
    assert b.hidden_size == want["td"] and b.num_hidden_layers == want["layers"]
    assert b.num_attention_heads == want["heads"] and b.num_key_value_heads == want["kv"]
    assert b.rms_norm_eps == config["text_config"]["rms_norm_eps"]
    assert b.rope_theta == config["text_config"]["rope_theta"]
    assert b.vocab_size == config["text_config"]["vocab_size"]
    assert b.tie_word_embeddings is want["tie"]
    assert spec.weights == str(folder)


def test_smolvlm2_omitted_keys_get_transformers_defaults():
    folder = published_folder("SmolVLM2-256M-Video-Instruct")
    config = json.loads((folder / "config.json").read_text())
    assert "intermediate_size" not in config["vision_config"]
    v = vlmkit.spec_from_hf(folder).vision_tower.params
    assert (v.intermediate_size, v.num_hidden_layers, v.layer_norm_eps, v.hidden_act) == (3072, 12, 1e-6, "gelu_pytorch_tanh")


def _mutated(tmp_path: Path, edit, name="SmolVLM-256M-Instruct") -> Path:
    src = published_folder(name)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst, symlinks=False)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


BAD = [
    ("scale_factor", lambda c: (c.update(scale_factor=3), c["text_config"].update(pixel_shuffle_factor=3)), "does not divide"),
    ("image_token_id", lambda c: c.update(image_token_id=60000), "outside the vocabulary"),
    ("vision_config.hidden_size", lambda c: c["vision_config"].update(hidden_size=0), "greater than 0"),
    ("text_config.hidden_size", lambda c: c["text_config"].update(hidden_size=-5), "greater than 0"),
    ("text_config.pixel_shuffle_factor", lambda c: c["text_config"].update(pixel_shuffle_factor=2), "pixel_shuffle_factor"),
    ("vision_config.image_size", lambda c: c["vision_config"].update(image_size=8), "smaller than patch_size"),
    ("text_config.perceiver_config.resampler_n_latents",
     lambda c: c["text_config"]["perceiver_config"].update(resampler_n_latents=81), "resampler_n_latents"),
    ("vocab_size", lambda c: c.update(vocab_size=1000), "vocab_size"),
    ("model_type", lambda c: c.update(model_type="blip9"), "blip9"),
    ("vision_config", lambda c: c.update(vision_config=[1, 2]), "mapping"),
]


@pytest.mark.parametrize("key_path,edit,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_config_values_name_the_key(tmp_path, key_path, edit, needle):
    folder = _mutated(tmp_path, edit)
    with pytest.raises(SpecError) as info:
        vlmkit.spec_from_hf(folder)
    err = info.value
    assert err.key_path == key_path, str(err)
    assert needle in str(err)
    assert "config.json" in str(err)


def test_processor_config_disagreement(tmp_path):
    folder = _mutated(tmp_path, lambda c: None)
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": 81}))
    with pytest.raises(SpecError, match="image_seq_len is 81"):
        vlmkit.spec_from_hf(folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(vlmkit.errors.SourceNotFoundError, match="no folder"):
        vlmkit.spec_from_hf(tmp_path / "nope" / "deeper")


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        vlmkit.spec_from_hf(tmp_path)


def test_offline_repo_id_falls_back_to_bundled_configs(caplog):
    spec = vlmkit.spec_from_hf("HuggingFaceTB/SmolVLM-256M-Instruct")
    assert spec.backbone.params.hidden_size == 576
    assert "bundled" in caplog.text


def test_unknown_offline_repo_id():
    with pytest.raises(vlmkit.errors.SourceNotFoundError, match="cannot be reached|not in the local"):
        vlmkit.spec_from_hf("someone/not-cached-model")
