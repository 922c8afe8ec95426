"""The llava family: a tiny random LlavaForConditionalGeneration saved by transformers builds in
vlmkit through the family boundary alone, with the same logits and greedy tokens, and exports back."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

import vlmkit  # noqa: E402

IMAGE = 60
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=16,
              patch_size=4, hidden_act="quick_gelu")  # fmt: skip
TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128)  # fmt: skip
CASES = {
    "layer-2-default": dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "layer-1-full": dict(vision_feature_layer=-1, vision_feature_select_strategy="full"),
    "gqa-tied": dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                     text=dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def _checkpoint(tmp_path, case: dict):
    torch.manual_seed(0)
    text = {**TEXT, **case.get("text", {})}
    top = {k: v for k, v in case.items() if k != "text"}
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION).to_dict(), text_config=LlamaConfig(**text).to_dict(),
                      image_token_index=IMAGE, tie_word_embeddings=text.get("tie_word_embeddings", False), **top)  # fmt: skip
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: clear argmax gaps
        for p in hf.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    hf.save_pretrained(tmp_path / "llava")
    return hf, tmp_path / "llava"


def _inputs(tokens_per_image: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(1, 50, (1, 3), generator=g), torch.full((1, tokens_per_image), IMAGE),
                     torch.randint(1, 50, (1, 4), generator=g)], dim=1)  # fmt: skip
    return ids, torch.randn(1, 3, 16, 16, generator=g)


@pytest.mark.parametrize("name", list(CASES))
def test_llava_checkpoint_builds_with_equal_logits_and_greedy_tokens(tmp_path, name):
    hf, folder = _checkpoint(tmp_path, CASES[name])
    ours = vlmkit.build_from_hf(folder)
    assert ours.load_report.ok and not ours.untrained_parameters()
    assert ours.spec.vision_tower.name == "clip" and ours.spec.connector.name == "mlp"
    k = ours.packer.tokens_per_image
    assert k == (16 // 4) ** 2 + (CASES[name]["vision_feature_select_strategy"] == "full")
    ids, pixels = _inputs(k)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels[None]).logits
    assert (got - want).abs().max().item() < 1e-4
    with torch.no_grad():
        hf_tokens = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]  # fmt: skip
    our_tokens = ours.generate(ids, pixel_values=pixels[None], max_new_tokens=6, eos_token_id=[], pad_token_id=0)[0, ids.shape[1]:]
    assert our_tokens.tolist() == hf_tokens.tolist()


def test_llava_exports_back_to_transformers(tmp_path):
    hf, folder = _checkpoint(tmp_path, CASES["layer-2-default"])
    ours = vlmkit.build_from_hf(folder)
    ours.save_pretrained(tmp_path / "export")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    ids, pixels = _inputs(ours.packer.tokens_per_image)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, pixel_values=pixels).logits, hf(input_ids=ids, pixel_values=pixels).logits)


def test_published_llava_layout_loads_too(tmp_path):
    """llava-hf / transformers 4.x files keep the tower under vision_tower.vision_model."""
    from safetensors.torch import load_file, save_file

    hf, folder = _checkpoint(tmp_path, CASES["layer-2-default"])
    tensors = load_file(folder / "model.safetensors")
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
               for k, v in tensors.items()}  # fmt: skip
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    ours = vlmkit.build_from_hf(folder)
    ids, pixels = _inputs(ours.packer.tokens_per_image)
    with torch.no_grad():
        diff = (ours(ids, pixel_values=pixels[None]).logits - hf(input_ids=ids, pixel_values=pixels).logits).abs().max()
    assert diff.item() < 1e-4


def test_a_navit_tower_in_front_of_a_llava_text_model_builds_from_yaml(tmp_path):
    """A model YAML mixing families: SmolVLM's navit tower and idefics3 connector (fresh) before the
    text model of a llava checkpoint (its `language_model.` tensors, through the llava family)."""
    hf, folder = _checkpoint(tmp_path, CASES["gqa-tied"])
    text = vlmkit.spec_from_hf(folder).backbone
    spec = {
        "vision_tower": {"name": "navit", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "image_size": 16, "patch_size": 4},
        "connector": {"name": "idefics3", "scale_factor": 2},
        "packer": {"name": "image_packer", "image_token_id": IMAGE},
        "backbone": text.to_dict(),
        "weights": {"backbone": str(folder)},
    }  # fmt: skip
    ours = vlmkit.build(spec)
    assert ours.packer.tokens_per_image == 4
    ids = torch.randint(1, 50, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(ids).logits - hf(input_ids=ids).logits).abs().max()
        pixels = torch.randn(1, 1, 3, 16, 16)
        with_image = ours(torch.cat([ids[:, :2], torch.full((1, 4), IMAGE), ids[:, 2:]], 1), pixel_values=pixels)
    assert diff.item() < 1e-4 and with_image.logits.shape == (1, 13, TEXT["vocab_size"])
