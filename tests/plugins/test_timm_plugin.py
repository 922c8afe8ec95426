"""The vlmkit-timm distribution as users get it: found through its entry point, listed by
``vlmkit plugins``, and its tower building configs/timm-vit-smollm2.yaml.

CI installs it first: ``pip install -e plugins/vlmkit-timm``.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit import plugins

pytestmark = pytest.mark.plugins

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "timm-vit-smollm2.yaml"


@pytest.fixture(autouse=True, scope="module")
def _installed():
    try:
        importlib.metadata.distribution("vlmkit-timm")
    except importlib.metadata.PackageNotFoundError:
        msg = "vlmkit-timm is not installed (pip install -e plugins/vlmkit-timm)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)


def _run(code: str, **env: str) -> str:
    full_env = {**os.environ, "COLUMNS": "200", **env}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_found_through_its_entry_point():
    eps = [ep for ep in importlib.metadata.entry_points(group="vlmkit") if ep.name == "timm"]
    assert len(eps) == 1, eps
    assert eps[0].value == "vlmkit_timm" and eps[0].dist is not None and eps[0].dist.name == "vlmkit-timm"
    assert "vlmkit_timm" not in plugins.BUILTIN_MODULES
    assert plugins.plugin_sources()["timm"] == "vlmkit-timm"
    entry = plugins.get_registry().get("vision_tower", "timm")
    assert entry.plugin == "timm" and entry.cls.__module__ == "vlmkit_timm"
    assert not [f for f in plugins.failures() if f.distribution == "vlmkit-timm"]
    # with entry points off, nothing else brings it in (it is not imported by path)
    code = "from vlmkit import plugins; print(plugins.get_registry().names('vision_tower'))"
    assert "timm" not in _run(code, VLMKIT_DISABLE_ENTRYPOINTS="1")
    assert "timm" not in _run(code, VLMKIT_BLOCK_PLUGINS="vlmkit-timm")


def test_vlmkit_plugins_lists_it(capsys, monkeypatch):
    from vlmkit.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if " timm " in line)
    assert "vision_tower" in row and "vlmkit-timm" in row


def test_siglip_cross_check_through_the_registry():
    from vlmkit_timm import siglip_to_timm

    registry = plugins.get_registry()
    timm_cls = registry.get("vision_tower", "timm").cls
    siglip_cls = registry.get("vision_tower", "siglip").cls
    torch.manual_seed(0)
    siglip = siglip_cls(siglip_cls.Params(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=32, patch_size=8,
                                          hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)).eval()  # fmt: skip
    with torch.no_grad():
        for p in siglip.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tower = timm_cls(timm_cls.Params(model_name="vit_base_patch16_siglip_224", img_size=32,
                                     model_kwargs={"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4,
                                                   "act_layer": "gelu_tanh"})).eval()  # fmt: skip
    published = {"vision_model." + k: v for k, v in siglip.key_map().export(siglip.state_dict()).items()}
    ckpt = siglip_to_timm(published)
    tower.load_state_dict({r.local: ckpt[r.sources[0]] for r in tower.key_map()}, strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (tower(pixels) - siglip(pixels)).abs().max().item()
    print(f"siglip vs timm max abs diff: {diff:.3g}")
    assert diff <= 1e-4


@pytest.fixture(scope="module")
def config_model():
    return vlmkit.build(CONFIG, load_weights=False)


def test_config_builds_with_numbers_from_timm(config_model):
    model = config_model
    spec = vlmkit.load_yaml(CONFIG)
    assert set(spec.vision_tower.params.model_dump(exclude_defaults=True)) == {"model_name"}
    assert spec.weights_for("backbone") == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert spec.weights_for("vision_tower") is None
    tower = model.vision_tower
    assert (tower.hidden_size, tower.patch_size, tower.image_size, tower.num_patches_per_side) == (384, 16, 224, 14)
    assert model.packer.tokens_per_image == 49 and model.packer.image_token_id == 49190
    assert model.backbone.vocab_size == 49280 and model.backbone.hidden_size == 576
    assert model.aligner.is_identity
    assert set(model.untrained_parameters()) == {"vision_tower", "connector", "backbone"}  # nothing loaded


def test_config_forward_and_generate(config_model):
    model = config_model
    ids = torch.tensor([[1, 504, *[49190] * 49, 30]])
    pixels = torch.rand(1, 1, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        logits = model(ids, pixel_values=pixels).logits
    assert logits.shape == (1, ids.shape[1], 49280) and bool(torch.isfinite(logits).all())
    try:
        import vlmkit.generation  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"vlmkit.generation is not available yet ({exc}); forward checked only")
    out = model.generate(ids, pixel_values=pixels, max_new_tokens=3, eos_token_id=[], pad_token_id=2)
    assert out.shape == (1, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)
    assert int(out.max()) < 49280
