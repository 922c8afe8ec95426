"""fp32 parity of the LLaVA parts -- the ``clip`` tower, the ``mlp`` connector and CLIP image
preprocessing -- with tiny random transformers twins (no downloads).

The tower and connector are compared with ``LlavaModel.get_image_features`` itself (transformers'
own feature-layer selection, class-token handling and projector), after copying the twin's
``vision_tower`` / ``multi_modal_projector`` weights through the components' prefix-free key maps.
Pixels are compared with ``CLIPImageProcessorPil`` (transformers' Pillow backend), exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

transformers = pytest.importorskip("transformers")

from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig  # noqa: E402
from transformers.models.llava.modeling_llava import LlavaModel, LlavaMultiModalProjector  # noqa: E402

import vlmkit  # noqa: E402
from vlmkit import testing  # noqa: E402
from vlmkit.components.clip import ClipParams, ClipVisionTower  # noqa: E402
from vlmkit.components.clip_image import ClipImageSettings, preprocess  # noqa: E402
from vlmkit.components.mlp_connector import MlpConnector, MlpConnectorParams  # noqa: E402
from vlmkit.errors import ProcessorError, SpecError  # noqa: E402

ATOL = 1e-4

SHAPES = {
    "w32p8": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8),
    "w24p7": dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3, image_size=30, patch_size=7),
}  # fmt: skip
TEXT = dict(vocab_size=64, hidden_size=40, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip


def load_through_key_map(component: torch.nn.Module, checkpoint: dict[str, torch.Tensor]) -> None:
    """Fill ``component`` from checkpoint-named tensors (strict: every key used, none missing)."""
    km = component.key_map()
    assert sorted(km.checkpoint_keys()) == sorted(checkpoint), "key map and checkpoint keys differ"
    component.load_state_dict({rule.local: checkpoint[rule.sources[0]] for rule in km}, strict=True)


def llava_pair(shape: str, layer, strategy: str, act: str = "quick_gelu", proj_act: str = "gelu", bias: bool = True):
    """A tiny ``LlavaModel`` and the vlmkit tower + connector holding its weights."""
    torch.manual_seed(0)
    vision = dict(SHAPES[shape], hidden_act=act)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**TEXT), image_token_index=63,
        vision_feature_layer=layer, vision_feature_select_strategy=strategy,
        projector_hidden_act=proj_act, multimodal_projector_bias=bias,
    )  # fmt: skip
    hf = LlavaModel(cfg).eval()
    tower = ClipVisionTower(ClipParams(**vision, vision_feature_layer=layer, vision_feature_select_strategy=strategy))
    conn = MlpConnector(
        MlpConnectorParams(projector_hidden_act=proj_act, multimodal_projector_bias=bias),
        in_features=tower.hidden_size, grid=tower.num_patches_per_side, out_features=TEXT["hidden_size"],
        num_tokens=tower.num_tokens,
    )  # fmt: skip
    load_through_key_map(tower, hf.vision_tower.state_dict())
    load_through_key_map(conn, hf.multi_modal_projector.state_dict())
    return hf, tower.eval(), conn.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def reference_features(hf: LlavaModel, pixels: torch.Tensor, **kwargs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """transformers' projected image features ``(N, K, D)`` and the tower's hidden states."""
    with torch.no_grad():
        out = hf.get_image_features(
            pixel_values=pixels, vision_feature_layer=hf.config.vision_feature_layer,
            vision_feature_select_strategy=hf.config.vision_feature_select_strategy, output_hidden_states=True, **kwargs,
        )  # fmt: skip
    return torch.stack(list(out.pooler_output)), out.hidden_states


CASES = [
    # shape, vision_feature_layer, strategy, hidden_act
    ("w32p8", -1, "default", "quick_gelu"),
    ("w32p8", -2, "default", "quick_gelu"),
    ("w32p8", -2, "full", "gelu"),
    ("w32p8", [-3, -1], "default", "gelu"),
    ("w24p7", [0, -2], "full", "quick_gelu"),
    ("w24p7", 2, "default", "gelu"),
]


@pytest.mark.parametrize(("shape", "layer", "strategy", "act"), CASES, ids=lambda v: str(v).replace(" ", ""))
def test_tower_and_connector_match_llava(shape, layer, strategy, act):
    hf, tower, conn = llava_pair(shape, layer, strategy, act)
    side = SHAPES[shape]["image_size"]
    pixels = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(1))
    ref, hidden_states = reference_features(hf, pixels)
    layers = [layer] if isinstance(layer, int) else layer
    ref_feats = torch.cat([hidden_states[i] if strategy == "full" else hidden_states[i][:, 1:] for i in layers], -1)
    with torch.no_grad():
        feats = tower(pixels)
        out = conn(feats)
    grid = side // SHAPES[shape]["patch_size"]
    assert feats.shape == (3, grid * grid + (strategy == "full"), SHAPES[shape]["hidden_size"] * len(layers))
    assert feats.shape[1] == tower.num_tokens == conn.tokens_per_image
    d_feat, d_out = max_diff(feats, ref_feats), max_diff(out, ref)
    print(f"[parity] clip {shape} layer={layer} {strategy} {act}: features {d_feat:.2e}, projected {d_out:.2e}")
    assert d_feat <= ATOL and d_out <= ATOL
    with torch.enable_grad():  # the autograd path (no in-place stream) computes the same
        assert max_diff(tower(pixels).detach(), ref_feats) <= ATOL


def test_non_native_size_interpolates_positions():
    """Another input size: transformers' ``interpolate_pos_encoding=True``."""
    hf, tower, conn = llava_pair("w32p8", -1, "full")
    pixels = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    ref, _ = reference_features(hf, pixels, interpolate_pos_encoding=True)
    with torch.no_grad():
        out = conn(tower(pixels))
    assert out.shape == (2, 6 * 5 + 1, TEXT["hidden_size"])
    assert max_diff(out, ref) <= ATOL


def test_unused_layers_are_inert_but_loadable():
    """Layers after the feature layer and post_layernorm: in the state dict (a checkpoint's every
    tensor is read), never computed, without gradients."""
    _, tower, _ = llava_pair("w32p8", -2, "default")
    assert sorted(tower.inert_parameters) == sorted(
        n for n, _ in tower.named_parameters() if n.startswith(("encoder.layers.2.", "post_layernorm."))
    )
    assert all(not p.requires_grad for n, p in tower.named_parameters() if n in tower.inert_parameters)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = tower(pixels)
        for name, p in tower.named_parameters():
            if name in tower.inert_parameters:
                p.fill_(float("nan"))
        assert torch.equal(tower(pixels), before)


def test_patch_mask_hides_padded_patches():
    """The optional patch mask: all True equals no mask; masked patches no longer change the rest."""
    _, tower, _ = llava_pair("w32p8", -1, "full")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(tower(pixels, mask), tower(pixels))
        mask[:, 3] = False
        noisy = pixels.clone()
        noisy[:, :, 24:] = 5.0
        a, b = tower(pixels, mask), tower(noisy, mask)
    keep = torch.cat([torch.tensor([True]), mask[0].flatten()])
    assert max_diff(a[:, keep], b[:, keep]) <= 1e-5
    with pytest.raises(ProcessorError, match="patch_attention_mask has shape"):
        tower(pixels, torch.ones(2, 3, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    ("act", "bias", "layers"), [("gelu", True, 1), ("gelu_pytorch_tanh", False, 2), ("silu", True, 3)]
)
def test_mlp_connector_matches_projector(act, bias, layers):
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=24), text_config=LlamaConfig(**TEXT),
        vision_feature_layer=-1 if layers == 1 else list(range(-layers, 0)),
        projector_hidden_act=act, multimodal_projector_bias=bias,
    )  # fmt: skip
    hf = LlavaMultiModalProjector(cfg).eval()
    ours = MlpConnector(
        MlpConnectorParams(projector_hidden_act=act, multimodal_projector_bias=bias),
        in_features=24 * layers, grid=3, out_features=TEXT["hidden_size"],
    ).eval()  # fmt: skip
    load_through_key_map(ours, hf.state_dict())
    assert ours.tokens_per_image == 9
    x = torch.randn(2, 9, 24 * layers)
    with torch.no_grad():
        assert max_diff(ours(x), hf(x)) <= ATOL


def test_bad_params_are_clear_errors():
    with pytest.raises(ValidationError, match=r"vision_feature_layer 4 is out of range .* valid indices are -4\.\.3"):
        ClipParams(num_hidden_layers=3, vision_feature_layer=4)
    with pytest.raises(ValidationError, match="empty list"):
        ClipParams(vision_feature_layer=[])
    with pytest.raises(ValidationError, match="vision_feature_select_strategy"):
        ClipParams(vision_feature_select_strategy="cls")
    with pytest.raises(ValidationError, match="valid integer"):
        ClipParams(vision_feature_layer=True)
    with pytest.raises(SpecError, match="num_tokens=0"):
        MlpConnector(MlpConnectorParams(), in_features=4, grid=2, out_features=4, num_tokens=0)
    spec = {
        "vision_tower": {"name": "clip", **SHAPES["w32p8"], "vision_feature_layer": -7},
        "connector": {"name": "mlp"}, "aligner": {"name": "hidden_align"},
        "packer": {"name": "image_packer", "image_token_id": 63},
        "backbone": {"name": "llama", **TEXT},
    }  # fmt: skip
    with pytest.raises(SpecError, match="vision_tower.*vision_feature_layer -7 is out of range"):
        vlmkit.build(spec, load_weights=False)


def test_yaml_clip_mlp_llama_runs():
    """A YAML-form model with the clip tower and mlp connector builds and runs one image."""
    spec = {
        "vision_tower": {"name": "clip", **SHAPES["w32p8"], "vision_feature_layer": [-2, -1]},
        "connector": {"name": "mlp", "projector_hidden_act": "gelu"}, "aligner": {"name": "hidden_align"},
        "packer": {"name": "image_packer", "image_token_id": 63},
        "backbone": {"name": "llama", **TEXT},
    }  # fmt: skip
    model = vlmkit.build(spec, load_weights=False).eval()
    assert model.packer.tokens_per_image == 16
    ids = torch.tensor([[1, *[63] * 16, 2]])
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 1, 3, 32, 32)).logits
    assert logits.shape == (1, 18, TEXT["vocab_size"]) and bool(torch.isfinite(logits).all())


def test_full_strategy_tower_conforms():
    """The conformance kit's tower checks with the class token kept (no whole-model build: the
    builder must pass the tower's num_tokens to the connector for that)."""
    params = {"hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 1, "num_attention_heads": 3,
              "image_size": 12, "patch_size": 4, "vision_feature_layer": [0, -1], "vision_feature_select_strategy": "full"}  # fmt: skip
    testing.check_vision_tower(ClipVisionTower, params, build=False)


# ---- image preprocessing ------------------------------------------------------------------------
PROCESSOR_CONFIGS = {
    "llava": dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    "wide-crop": dict(size={"shortest_edge": 20}, crop_size={"height": 24, "width": 30}),  # crop > image: padded
    "exact-size": dict(size={"height": 30, "width": 40}, do_center_crop=False),
    "legacy-ints": dict(size=40, crop_size=28, resample=2, image_mean=0.5, image_std=[0.5, 0.25, 0.1]),
    "no-resize": dict(do_resize=False, crop_size={"height": 20, "width": 20}, do_normalize=False),
}
IMAGE_SIZES = [(37, 53), (80, 21), (16, 16), (300, 200), (13, 9)]
MODES = ["RGB", "RGBA", "L", "LA", "P"]


def random_image(h: int, w: int, mode: str, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


@pytest.mark.parametrize("name", PROCESSOR_CONFIGS)
def test_preprocess_matches_clip_image_processor(name):
    cfg = PROCESSOR_CONFIGS[name]
    ref = CLIPImageProcessorPil(**cfg)
    settings = ClipImageSettings.from_config(ref.to_dict())  # the dict transformers would save
    assert settings == ClipImageSettings.from_config(cfg)
    worst = 0.0
    for k, (h, w) in enumerate(IMAGE_SIZES):
        for mode in MODES:
            image = random_image(h, w, mode, seed=k)
            want = torch.as_tensor(ref(image, return_tensors="pt")["pixel_values"][0]).float()
            got = preprocess(image, settings)
            assert got.dtype == torch.float32 and got.shape == want.shape, (h, w, mode, got.shape, want.shape)
            worst = max(worst, max_diff(got, want))
    print(f"[parity] clip preprocess {name}: max abs diff {worst:.1e}")
    assert worst <= 1e-6


@pytest.mark.parametrize(
    ("cfg", "key", "message"),
    [
        ({"size": {"longest_edge": 3}}, "size", "shortest_edge"),
        ({"size": {"shortest_edge": 0}}, "size.shortest_edge", "positive"),
        ({"crop_size": {"height": 4}}, "crop_size", "height"),
        ({"resample": 9}, "resample", "BICUBIC"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std", "positive"),
        ({"image_mean": [0.5, 0.5]}, "image_mean", "3 numbers"),
        ({"do_resize": "yes"}, "do_resize", "true or false"),
        ({"rescale_factor": -1}, "rescale_factor", "positive"),
        ({"do_pad": True}, "do_pad", "known keys"),
    ],
)
def test_bad_processor_config_is_a_spec_error(cfg, key, message):
    with pytest.raises(SpecError, match=message) as info:
        ClipImageSettings.from_config(cfg, source="preprocessor_config.json")
    assert info.value.key_path == key and info.value.source == "preprocessor_config.json"


def test_preprocess_refuses_unusable_images():
    with pytest.raises(ProcessorError, match="mode 'I;16'"):
        preprocess(Image.new("I;16", (8, 8)), ClipImageSettings())
    with pytest.raises(ProcessorError, match="do_convert_rgb is off"):
        preprocess(Image.new("L", (8, 8)), ClipImageSettings(do_convert_rgb=False))


def test_idefics3_connector_refuses_a_kept_class_token():
    from vlmkit.errors import SpecError

    spec = {
        "vision_tower": {"name": "clip", "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
                         "num_attention_heads": 3, "image_size": 16, "patch_size": 4,
                         "vision_feature_select_strategy": "full"},
        "connector": {"name": "idefics3", "scale_factor": 2},
        "packer": {"name": "image_packer", "image_token_id": 3},
        "backbone": {"name": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2},
    }  # fmt: skip
    with pytest.raises(SpecError, match="17 feature rows per image"):
        vlmkit.build(spec, load_weights=False)
    spec["vision_tower"]["vision_feature_select_strategy"] = "default"
    assert vlmkit.build(spec, load_weights=False).packer.tokens_per_image == 4
