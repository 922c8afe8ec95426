"""A swapped model: a timm tower (vlmkit-timm) + the idefics3 connector + a pretrained tiny Llama.

Tower and backbone are frozen (YAML ``freeze:``); only the new connector trains, on a toy task
whose answer token is the image's colour. ``untrained_parameters()`` and ``vlmkit inspect`` name
the parts that got no pretrained weights.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch
import yaml

import vlmkit
from vlmkit import plugins

from ..parity.tiny_hf import IMAGE_TOKEN, Shape, hf_config

pytestmark = pytest.mark.plugins

SHAPE = Shape("idefics3-s2-gqa")  # text: vocab 300, width 48, 4 heads / 2 kv heads, 2 layers, untied
ANSWERS = (10, 11, 12)  # red, green, blue
TOWER = {"name": "timm", "model_name": "vit_small_patch16_224", "img_size": 64,
         "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}}  # fmt: skip  # 4x4 patches


def _require_timm_plugin() -> None:
    try:
        importlib.metadata.distribution("vlmkit-timm")
    except importlib.metadata.PackageNotFoundError:
        msg = "vlmkit-timm is not installed (pip install -e plugins/vlmkit-timm)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    if "timm" not in plugins.get_registry().names("vision_tower"):
        pytest.fail(f"vlmkit-timm is installed but its tower is not registered; plugin failures: {plugins.failures()}")


def _tiny_checkpoint(folder) -> None:
    """A random tiny transformers Idefics3 checkpoint (as tests/parity/tiny_hf.py) whose LM head
    is scaled up so its logits can be confident, as a trained model's are (at init the largest
    reachable logit gap is ~1, so no connector could bring the loss down much)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.Idefics3ForConditionalGeneration(hf_config(SHAPE)).to(torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        hf.lm_head.weight.mul_(20.0)
    hf.save_pretrained(folder)


@pytest.fixture(scope="module")
def swapped_yaml(tmp_path_factory):
    _require_timm_plugin()
    folder = tmp_path_factory.mktemp("tiny-idefics3")
    _tiny_checkpoint(folder)
    text = {"vocab_size": 300, "hidden_size": SHAPE.text_width, "intermediate_size": 2 * SHAPE.text_width + 8,
            "num_hidden_layers": 2, "num_attention_heads": SHAPE.heads, "num_key_value_heads": SHAPE.kv_heads,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "pad_token_id": 0, "tie_word_embeddings": False}  # fmt: skip
    spec = {
        "vision_tower": TOWER,
        "connector": {"name": "idefics3", "scale_factor": 2},
        "packer": {"name": "image_packer", "image_token_id": IMAGE_TOKEN},
        "backbone": {"name": "llama", **text},
        "weights": {"backbone": str(folder)},
        "freeze": ["vision_tower", "backbone"],
    }
    path = folder / "swapped.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _batch(n_per_colour: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    colours = torch.arange(len(ANSWERS)).repeat_interleave(n_per_colour)
    pixels = torch.randn(len(colours), 1, 3, 64, 64, generator=g) * 0.3 - 1.0
    pixels[torch.arange(len(colours)), 0, colours] += 2.0  # that colour channel is bright
    k = 4  # (64/16 / 2) ** 2 visual tokens
    ids = torch.tensor([[1, *[IMAGE_TOKEN] * k, ANSWERS[c]] for c in colours.tolist()])
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return ids, pixels, labels


def test_untrained_parameters_name_the_new_parts(swapped_yaml):
    model = vlmkit.build(swapped_yaml)
    fresh = model.untrained_parameters()
    assert set(fresh) == {"vision_tower", "connector"}, fresh
    assert "model.blocks.0.attn.qkv.weight" in fresh["vision_tower"]
    assert fresh["connector"] == ["proj.weight"]
    assert model.load_report.ok and model.load_report.loaded["backbone"] > 0




def test_train_connector_only(swapped_yaml, one_thread):
    model = vlmkit.build(swapped_yaml)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connector.proj.weight"}, trainable
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids, pixels, labels = _batch(4, seed=0)
    losses = []
    model.train()
    for _ in range(40):
        loss = model(ids, pixel_values=pixels, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    print(f"toy training loss: initial {losses[0]:.3f} -> final {losses[-1]:.3f} "
          f"(every 10 steps: {[round(x, 3) for x in losses[::10]]})")  # fmt: skip
    assert losses[-1] < 0.5 * losses[0], losses

    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), f"frozen {name} changed"
            assert p.grad is None, f"frozen {name} got a gradient"

    test_ids, test_pixels, _ = _batch(2, seed=1)  # unseen noise
    with torch.no_grad():
        logits = model(test_ids, pixel_values=test_pixels).logits[:, -2]
    picked = logits[:, list(ANSWERS)].argmax(-1)
    want = torch.arange(len(ANSWERS)).repeat_interleave(2)
    assert (picked == want).float().mean() >= 0.8, (picked, want)


def test_inspect_lists_untrained_parts(swapped_yaml, capsys, monkeypatch):
    from vlmkit.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(swapped_yaml)]) == 0
    out = capsys.readouterr().out
    assert "timm (vlmkit-timm)" in out
    assert "no pretrained weights (vision_tower)" in out
    assert "no pretrained weights (connector)" in out
    assert "no pretrained weights (backbone)" not in out
