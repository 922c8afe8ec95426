"""vlmkit-timm's ``timm`` vision tower: conformance, what it reads from timm, and the SigLIP cross-check."""

from __future__ import annotations

import pytest
import torch
from vlmkit_timm import TimmParams, TimmVisionTower, siglip_to_timm

import vlmkit
from vlmkit import testing
from vlmkit.components.siglip import SiglipParams, SiglipVisionTower
from vlmkit.errors import SourceNotFoundError, SpecError

timm = pytest.importorskip("timm")

#: Tiny siglip-like timm ViT (what vit_*_siglip_* use: no class token, LayerNorm eps 1e-6,
#: tanh GELU) and the same architecture as a vlmkit ``siglip`` tower.
SIGLIP_TIMM = {
    "model_name": "vit_base_patch16_siglip_224", "img_size": 32,
    "model_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4, "act_layer": "gelu_tanh"},
}  # fmt: skip
SIGLIP_VLMKIT = {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "image_size": 32, "patch_size": 8, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}  # fmt: skip

TINY = {
    "siglip-like": SIGLIP_TIMM,
    "class-token": {"model_name": "vit_small_patch16_224", "img_size": 32,
                    "model_kwargs": {"embed_dim": 24, "depth": 1, "num_heads": 2}},
    "dinov2-registers": {"model_name": "vit_small_patch14_reg4_dinov2", "img_size": 28,
                         "model_kwargs": {"embed_dim": 24, "depth": 1, "num_heads": 2}},
    # final norm in the head (fc_norm): applied to the patch tokens
    "eva02-head-norm": {"model_name": "eva02_tiny_patch14_224.mim_in22k", "img_size": 28, "model_kwargs": {"depth": 1}},
    # non-persistent RoPE buffers: recomputed when built on meta (checkpoint loading)
    "rope-buffers": {"model_name": "vit_small_patch16_rope_224", "img_size": 32,
                     "model_kwargs": {"embed_dim": 24, "depth": 1, "num_heads": 2}},
}  # fmt: skip


@pytest.mark.parametrize("params", list(TINY.values()), ids=list(TINY))
def test_conforms(params):
    tower = testing.check_vision_tower(TimmVisionTower, params, name="timm")
    grid = params["img_size"] // tower.patch_size
    assert tower.num_patches_per_side == grid


@pytest.mark.parametrize(
    ("name", "img_size", "want"),
    [
        ("vit_small_patch16_224", None, dict(hidden_size=384, patch_size=16, image_size=224, grid=14, prefix=1, mean=0.5)),
        ("vit_base_patch16_siglip_512", None, dict(hidden_size=768, patch_size=16, image_size=512, grid=32, prefix=0, mean=0.5)),
        ("vit_small_patch14_dinov2", 224, dict(hidden_size=384, patch_size=14, image_size=224, grid=16, prefix=1, mean=0.485)),
        ("vit_small_patch14_reg4_dinov2", 224, dict(hidden_size=384, patch_size=14, image_size=224, grid=16, prefix=5, mean=0.485)),
    ],
)
def test_reads_everything_from_timm(name, img_size, want):
    with torch.device("meta"):  # no memory, no compute: the numbers come from timm's model object
        tower = TimmVisionTower(TimmParams(model_name=name, img_size=img_size))
    got = dict(hidden_size=tower.hidden_size, patch_size=tower.patch_size, image_size=tower.image_size,
               grid=tower.num_patches_per_side, prefix=tower.num_prefix_tokens, mean=tower.image_mean[0])  # fmt: skip
    assert got == pytest.approx(want)
    keys = [r.sources[0] for r in tower.key_map()]
    assert "blocks.0.attn.qkv.weight" in keys  # timm's own names; a checkpoint family adds its prefix
    assert not any(".head." in k or "attn_pool" in k for k in keys), "pooling/classifier heads are not built"


def test_meta_shape_trace_with_rope_buffers():
    with torch.device("meta"):  # what `vlmkit inspect` does to print one image's shapes
        tower = TimmVisionTower(TimmParams(**TINY["rope-buffers"]))
        out = tower(torch.zeros(1, 3, 32, 32))
    assert out.is_meta and out.shape == (1, 4, 24)


def test_unknown_name_lists_close_timm_names():
    spec = {
        "vision_tower": {"name": "timm", "model_name": "vit_smal_patch16_224"},
        "connector": {"name": "idefics3"},
        "packer": {"name": "image_packer", "image_token_id": 1},
        "backbone": {"name": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                     "num_hidden_layers": 1, "num_attention_heads": 1},
    }  # fmt: skip
    with pytest.raises(SpecError) as info:
        vlmkit.build(spec, load_weights=False)
    msg = str(info.value)
    assert info.value.key_path == "vision_tower.model_name"
    assert "vit_smal_patch16_224" in msg and "vit_small_patch16_224" in msg
    with pytest.raises(SpecError, match="vit_small_patch16_224"):
        TimmVisionTower({"model_name": "vit_smal_patch16_224"})


def test_non_vit_model_is_refused():
    with pytest.raises(SpecError, match="not ViT-style"):
        TimmVisionTower(TimmParams(model_name="resnet18"))


def test_pretrained_is_not_fetched_on_meta():
    with torch.device("meta"):  # the builder's path when a checkpoint supplies the tower: no download
        tower = TimmVisionTower(TimmParams(model_name="vit_small_patch16_224", pretrained=True))
    assert next(tower.parameters()).is_meta


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    def offline(name, pretrained=False, **kwargs):  # what timm raises without network or cache
        raise FileNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(SourceNotFoundError, match="pretrained weights of 'vit_small_patch16_224'") as info:
        TimmVisionTower(TimmParams(model_name="vit_small_patch16_224", pretrained=True))
    assert "weights: {vision_tower: folder}" in info.value.hint


def _siglip_pair(seed: int = 0):
    """A vlmkit siglip tower with random weights and a timm tower holding the same weights,
    moved over through the key maps: siglip local -> (siglip key_map) HF names -> timm names ->
    (timm tower key_map) timm tower local."""
    torch.manual_seed(seed)
    siglip = SiglipVisionTower(SiglipParams(**SIGLIP_VLMKIT)).eval()
    with torch.no_grad():
        for p in siglip.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = {"vision_model." + k: v for k, v in siglip.key_map().export(siglip.state_dict()).items()}  # a SigLIP file
    ckpt = siglip_to_timm(hf)
    tower = TimmVisionTower(TimmParams(**SIGLIP_TIMM)).eval()
    state = {rule.local: ckpt[rule.sources[0]] for rule in tower.key_map()}
    assert set(ckpt) == set(tower.key_map().checkpoint_keys())
    tower.load_state_dict(state, strict=True)
    return siglip, tower, ckpt


def test_siglip_cross_check():
    siglip, tower, ckpt = _siglip_pair()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = siglip(pixels)
        got = tower(pixels)
    diff = (got - want).abs().max().item()
    print(f"siglip vs timm tower max abs diff: {diff:.3g}")
    assert got.shape == want.shape == (3, 16, 48)
    assert diff <= 1e-4

    # a plain timm VisionTransformer built by hand with SigLIP settings computes the same
    from timm.models.vision_transformer import VisionTransformer

    raw = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, class_token=False,
                            global_pool="map", num_classes=0, act_layer="gelu_tanh").eval()  # fmt: skip
    missing, unexpected = raw.load_state_dict(dict(ckpt), strict=False)
    assert not unexpected and all(k.startswith("attn_pool.") for k in missing), (missing, unexpected)
    assert isinstance(raw.norm, torch.nn.LayerNorm) and raw.norm.eps == 1e-6
    with torch.no_grad():
        assert (raw.forward_features(pixels) - want).abs().max().item() <= 1e-4


def test_patch_mask_matches_siglip():
    siglip, tower, _ = _siglip_pair(seed=3)
    pixels = torch.randn(2, 3, 32, 32)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[1, 2:, :] = False  # bottom half of image 1 is padding
    with torch.no_grad():
        want, got = siglip(pixels, mask), tower(pixels, mask)
        unmasked = tower(pixels)
    assert (got - want).abs().max().item() <= 1e-4
    assert not torch.allclose(got[1], unmasked[1], atol=1e-4), "the mask changed nothing"
    torch.testing.assert_close(got[0], unmasked[0])


def test_loads_a_plain_timm_checkpoint_under_its_own_names(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    kwargs = dict(SIGLIP_TIMM["model_kwargs"], img_size=32)
    source = timm.create_model("vit_base_patch16_siglip_224", **kwargs).eval()  # with head + attn_pool
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    spec = {
        "vision_tower": {"name": "timm", **SIGLIP_TIMM},
        "connector": {"name": "idefics3", "scale_factor": 2},
        "packer": {"name": "image_packer", "image_token_id": 5},
        "backbone": {"name": "llama", "vocab_size": 16, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2},
        "weights": {"vision_tower": str(tmp_path)},
    }  # fmt: skip
    model = vlmkit.build(spec)
    assert "vision_tower" not in model.untrained_parameters()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_tower(pixels), source.forward_features(pixels))


def test_siglip_to_timm_refuses_unknown_keys():
    with pytest.raises(ValueError, match="no timm name"):
        siglip_to_timm({"vision_model.encoder.layers.0.weird.weight": torch.zeros(1)})
