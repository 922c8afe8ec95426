"""fp32 parity of the vision components with tiny random transformers twins (no downloads).

Each test builds a transformers module, copies its weights into the vlmkit component through the
component's ``key_map()`` and compares outputs (max abs diff <= 1e-4).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import Idefics3Config, Idefics3VisionConfig, SiglipVisionConfig, SiglipVisionModel  # noqa: E402
from transformers.models.idefics3.modeling_idefics3 import (  # noqa: E402
    Idefics3Connector as HFConnector,
)
from transformers.models.idefics3.modeling_idefics3 import (  # noqa: E402
    Idefics3Model,
    Idefics3VisionTransformer,
)

from vlmkit.components.hidden_align import HiddenAlign  # noqa: E402
from vlmkit.components.idefics3_connector import Idefics3Connector  # noqa: E402
from vlmkit.components.navit import NavitVisionTower  # noqa: E402
from vlmkit.components.siglip import SiglipVisionTower  # noqa: E402

ATOL = 1e-4

VISION_SHAPES = [
    # hidden, intermediate, layers, heads, image, patch
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8),
    dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, image_size=64, patch_size=8),
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14),
]


def load_through_key_map(component: torch.nn.Module, checkpoint: dict[str, torch.Tensor], slot: str | None = None) -> None:
    """Fill ``component`` from checkpoint-named tensors, concatenating fused sources on dim 0; with
    ``slot``, the checkpoint is in the Idefics3 family's layout (its prefixes)."""
    from vlmkit.family import family_for_config

    keymap = component.key_map()
    if slot is not None:
        keymap = family_for_config({"model_type": "idefics3"}).key_map(slot, keymap)
    state = {rule.local: torch.cat([checkpoint[s] for s in rule.sources], dim=0) for rule in keymap}
    component.load_state_dict(state, strict=True)


def prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def report(name: str, diff: float) -> float:
    print(f"[parity] {name}: max abs diff {diff:.3e}")
    return diff


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def patch_mask_from_pixels(pixel_mask: torch.Tensor, patch: int) -> torch.Tensor:
    """As ``Idefics3Model.get_image_features``: a patch is real if any of its pixels is."""
    sub = pixel_mask.unfold(1, patch, patch).unfold(2, patch, patch)
    return sub.sum(dim=(-1, -2)) > 0


def navit_pair(shape: dict, attn: str = "sdpa", act: str = "gelu_pytorch_tanh"):
    torch.manual_seed(0)
    cfg = Idefics3VisionConfig(**shape, hidden_act=act)
    cfg._attn_implementation = attn
    hf = Idefics3VisionTransformer(cfg).eval()
    ours = NavitVisionTower(NavitVisionTower.Params(**shape, hidden_act=act)).eval()
    load_through_key_map(ours, prefixed(hf.state_dict(), "model.vision_model."), "vision_tower")
    return hf, ours


def padded_pixel_mask(n: int, size: int, valid: list[tuple[int, int]]) -> torch.Tensor:
    """``(n, size, size)`` long mask, image ``i`` real on its top-left ``valid[i]`` pixels."""
    mask = torch.zeros(n, size, size, dtype=torch.long)
    for i, (h, w) in enumerate(valid):
        mask[i, :h, :w] = 1
    return mask


@pytest.mark.parametrize("shape", VISION_SHAPES, ids=["w64h4", "w48h3", "p14"])
def test_navit_full_images(shape):
    hf, ours = navit_pair(shape)
    size = shape["image_size"]
    pixels = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state
        out = ours(pixels)
        out_masked = ours(pixels, torch.ones(3, size // shape["patch_size"], size // shape["patch_size"], dtype=torch.bool))
    assert report(f"navit full {shape['hidden_size']}/{shape['patch_size']}", max_diff(out, ref)) <= ATOL
    assert max_diff(out_masked, ref) <= ATOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", VISION_SHAPES, ids=["w64h4", "w48h3", "p14"])
def test_navit_padded_and_mixed(shape, attn):
    hf, ours = navit_pair(shape, attn=attn)
    size, patch = shape["image_size"], shape["patch_size"]
    valid = [(size, size), (size - 2 * patch - 3, size), (size, size // 2 + 1), (patch * 3, patch * 2 - 5)]
    pixel_mask = padded_pixel_mask(len(valid), size, valid)
    pixels = torch.randn(len(valid), 3, size, size) * pixel_mask[:, None]
    patch_mask = patch_mask_from_pixels(pixel_mask, patch)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, patch_attention_mask=patch_mask).last_hidden_state
        out = ours(pixels, patch_mask)
        ref_padded = hf(pixel_values=pixels[1:2], patch_attention_mask=patch_mask[1:2]).last_hidden_state
        out_padded = ours(pixels[1:2], patch_mask[1:2])
    assert report(f"navit mixed batch {attn} {shape['hidden_size']}/{patch}", max_diff(out, ref)) <= ATOL
    assert report(f"navit padded only {attn} {shape['hidden_size']}/{patch}", max_diff(out_padded, ref_padded)) <= ATOL


def test_navit_non_native_size():
    """Inputs larger than image_size still bucket into the native position table."""
    shape = VISION_SHAPES[0]
    hf, ours = navit_pair(shape)
    pixels = torch.randn(2, 3, 96, 80)
    mask = torch.ones(2, 12, 10, dtype=torch.bool)
    mask[1, 7:, :] = False
    with torch.no_grad():
        diff = max_diff(ours(pixels, mask), hf(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state)
    assert report("navit 96x80 input", diff) <= ATOL


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "quick_gelu", "relu", "silu"])
def test_navit_activations(act):
    hf, ours = navit_pair(VISION_SHAPES[0], act=act)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = max_diff(ours(pixels), hf(pixel_values=pixels).last_hidden_state)
    assert report(f"navit act {act}", diff) <= ATOL


def siglip_pair(shape: dict):
    torch.manual_seed(1)
    hf = SiglipVisionModel(SiglipVisionConfig(**shape, vision_use_head=False)).eval()
    ours = SiglipVisionTower(SiglipVisionTower.Params(**shape)).eval()
    load_through_key_map(ours, hf.state_dict())  # the tower's own names
    return hf, ours


@pytest.mark.parametrize("shape", VISION_SHAPES, ids=["w64h4", "w48h3", "p14"])
def test_siglip_native_and_interpolated(shape):
    hf, ours = siglip_pair(shape)
    size, patch = shape["image_size"], shape["patch_size"]
    native = torch.randn(2, 3, size, size)
    bigger = torch.randn(2, 3, size + 2 * patch, size + 2 * patch)
    wide = torch.randn(1, 3, size - patch, size + 3 * patch)
    with torch.no_grad():
        d_native = max_diff(ours(native), hf(pixel_values=native).last_hidden_state)
        for name, px in (("interp", bigger), ("interp-nonsquare", wide)):
            ref = hf(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
            assert report(f"siglip {name} {shape['hidden_size']}/{patch}", max_diff(ours(px), ref)) <= ATOL
    assert report(f"siglip native {shape['hidden_size']}/{patch}", d_native) <= ATOL


def test_siglip_80px_on_64px_model():
    hf, ours = siglip_pair(VISION_SHAPES[0])
    pixels = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        diff = max_diff(ours(pixels), hf(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state)
    assert report("siglip 80x80 on 64 model", diff) <= ATOL


def hf_connector(vision_width: int, text_width: int, scale: int) -> HFConnector:
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=vision_width),
        text_config=dict(model_type="llama", hidden_size=text_width, num_attention_heads=4, num_key_value_heads=4),
        scale_factor=scale,
    )
    return HFConnector(cfg).eval()


@pytest.mark.parametrize(("scale", "grid"), [(2, 12), (3, 12), (4, 12), (4, 8), (1, 5)])
def test_connector(scale, grid):
    torch.manual_seed(2)
    hf = hf_connector(48, 40, scale)
    ours = Idefics3Connector(Idefics3Connector.Params(scale_factor=scale), in_features=48, grid=grid, out_features=40)
    load_through_key_map(ours, prefixed(hf.state_dict(), "model.connector."), "connector")
    feats = torch.randn(3, grid * grid, 48)
    with torch.no_grad():
        out, ref = ours(feats), hf(feats)
    assert out.shape == (3, ours.tokens_per_image, 40)
    assert report(f"connector s={scale} grid={grid}", max_diff(out, ref)) <= ATOL


def test_navit_plus_connector_match_get_image_features():
    """Tower + connector against ``Idefics3Model.get_image_features`` on a padded batch."""
    torch.manual_seed(3)
    vision = VISION_SHAPES[0]
    cfg = Idefics3Config(
        vision_config=vision,
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=300),
        scale_factor=2,
        image_token_id=299,
    )
    hf = Idefics3Model(cfg).eval()
    tower = NavitVisionTower(NavitVisionTower.Params(**vision)).eval()
    conn = Idefics3Connector(Idefics3Connector.Params(scale_factor=2), in_features=64, grid=8, out_features=32)
    checkpoint = prefixed(hf.state_dict(), "model.")
    load_through_key_map(tower, checkpoint, "vision_tower")
    load_through_key_map(conn, checkpoint, "connector")
    pixel_mask = padded_pixel_mask(2, 64, [(64, 64), (40, 64)])
    pixels = torch.randn(2, 3, 64, 64) * pixel_mask[:, None]
    with torch.no_grad():
        ref = hf.get_image_features(pixels[None], pixel_mask[None]).pooler_output[0]
        out = conn(tower(pixels, patch_mask_from_pixels(pixel_mask, 8)))
    assert report("navit+connector vs get_image_features", max_diff(out.reshape(-1, 32), ref)) <= ATOL


def test_hidden_align_identity_and_linear():
    tokens = torch.randn(2, 5, 16)
    ident = HiddenAlign(HiddenAlign.Params(), in_features=16, out_features=16)
    assert ident(tokens) is tokens and len(ident.key_map()) == 0
    torch.manual_seed(4)
    ref = torch.nn.Linear(16, 24, bias=False)
    lin = HiddenAlign(HiddenAlign.Params(), in_features=16, out_features=24)
    load_through_key_map(lin, {"model.aligner.proj.weight": ref.weight.detach()}, "aligner")
    with torch.no_grad():
        diff = max_diff(lin(tokens), ref(tokens))
    assert report("hidden_align linear", diff) <= ATOL
