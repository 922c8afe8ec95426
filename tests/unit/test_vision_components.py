"""Unit tests of the built-in vision-side components: params, key maps, meta build, registration."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest
import torch

from vlmkit.components import clip, clip_image, hidden_align, idefics3_connector, navit, siglip
from vlmkit.components.hidden_align import HiddenAlign
from vlmkit.components.idefics3_connector import Idefics3Connector
from vlmkit.components.navit import NavitVisionTower
from vlmkit.components.siglip import SiglipVisionTower
from vlmkit.errors import ProcessorError, SpecError, VlmkitError
from vlmkit.protocols import Aligner, Connector, VisionTower
from vlmkit.registry import Registry

TINY = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, image_size=64, patch_size=8)
CONFIGS = Path(__file__).resolve().parents[2] / "vlmkit" / "data" / "hf-configs"


def tower(cls, **overrides):
    return cls(cls.Params(**{**TINY, **overrides}))


def connector(scale=2, grid=8, in_features=48, out_features=32):
    return Idefics3Connector(
        Idefics3Connector.Params(scale_factor=scale), in_features=in_features, grid=grid, out_features=out_features
    )


# --------------------------------------------------------------------------- params validation


@pytest.mark.parametrize("cls", [NavitVisionTower, SiglipVisionTower])
def test_unknown_activation_lists_choices(cls):
    with pytest.raises(pydantic.ValidationError) as info:
        cls.Params(hidden_act="gelu_fancy")
    text = str(info.value)
    assert "hidden_act" in text and "gelu_fancy" in text
    for name in ("gelu_pytorch_tanh", "gelu", "quick_gelu", "relu", "silu"):
        assert repr(name) in text


@pytest.mark.parametrize("cls", [NavitVisionTower, SiglipVisionTower])
@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_channels", "image_size", "patch_size"])
def test_non_positive_ints_rejected(cls, field):
    with pytest.raises(pydantic.ValidationError) as info:
        cls.Params(**{field: 0})
    text = str(info.value)
    assert field in text and "greater than 0" in text and "input_value=0" in text


def test_image_size_must_hold_a_patch():
    with pytest.raises(pydantic.ValidationError) as info:
        NavitVisionTower.Params(image_size=12, patch_size=16)
    text = str(info.value)
    assert "image_size=12" in text and "patch_size=16" in text and "smaller" in text


def test_image_size_remainder_is_allowed_like_transformers():
    # SigLIP-so400m: 384 px / 14 px patches -> a 27 x 27 grid, the last 6 pixels unseen.
    tower = NavitVisionTower(NavitVisionTower.Params(hidden_size=16, num_attention_heads=2, intermediate_size=8,
                                                     num_hidden_layers=1, image_size=384, patch_size=14))
    assert tower.num_patches_per_side == 27


def test_heads_must_divide_hidden():
    with pytest.raises(pydantic.ValidationError) as info:
        SiglipVisionTower.Params(hidden_size=100, num_attention_heads=3)
    text = str(info.value)
    assert "hidden_size=100" in text and "num_attention_heads=3" in text and "4" in text


def test_unknown_keys_and_bad_dropout_rejected():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        NavitVisionTower.Params(vision_use_head=True)
    with pytest.raises(pydantic.ValidationError, match="attention_dropout"):
        NavitVisionTower.Params(attention_dropout=1.5)
    with pytest.raises(pydantic.ValidationError, match="scale_factor"):
        Idefics3Connector.Params(scale_factor=0)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        HiddenAlign.Params(width=3)


def test_defaults_match_transformers_configs():
    transformers = pytest.importorskip("transformers")
    for ours, theirs in ((navit.NavitParams(), transformers.Idefics3VisionConfig()),
                         (siglip.SiglipParams(), transformers.SiglipVisionConfig())):
        for name, value in ours.model_dump().items():
            assert getattr(theirs, name) == value, name
    assert idefics3_connector.Idefics3ConnectorParams().scale_factor == transformers.Idefics3Config().scale_factor


def test_clip_defaults_match_transformers():
    """A LLaVA config.json may leave any of these out; transformers then uses its class defaults."""
    transformers = pytest.importorskip("transformers")
    vision, llava = transformers.CLIPVisionConfig(), transformers.LlavaConfig()
    for name, value in clip.ClipParams().model_dump().items():
        theirs = getattr(llava if name.startswith("vision_feature_") else vision, name)
        assert theirs == value, name
    ours, theirs = clip_image.ClipImageSettings(), transformers.CLIPImageProcessor()
    assert ours.shortest_edge == theirs.size.shortest_edge and ours.resize_to is None
    assert ours.crop_size == (theirs.crop_size.height, theirs.crop_size.width)
    assert ours.resample == int(theirs.resample)
    for name in ("do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.image_mean == tuple(theirs.image_mean) and ours.image_std == tuple(theirs.image_std)


@pytest.mark.parametrize("model", ["SmolVLM-256M-Instruct", "SmolVLM-500M-Instruct"])
def test_bundled_smolvlm_configs_validate(model):
    config = json.loads((CONFIGS / model / "config.json").read_text())
    fields = navit.NavitParams.model_fields
    params = navit.NavitParams(**{k: v for k, v in config["vision_config"].items() if k in fields})
    assert (params.hidden_size, params.image_size, params.patch_size) == (768, 512, 16)
    with torch.device("meta"):
        vt = NavitVisionTower(params)
        conn = Idefics3Connector(Idefics3Connector.Params(scale_factor=config["scale_factor"]),
                                 in_features=vt.hidden_size, grid=vt.num_patches_per_side,
                                 out_features=config["text_config"]["hidden_size"])
    assert vt.num_patches_per_side == 32 and conn.tokens_per_image == 64


# --------------------------------------------------------------------------- connector errors


def test_scale_not_dividing_grid_is_spec_error():
    with pytest.raises(SpecError) as info:
        connector(scale=5, grid=12)
    text = str(info.value)
    assert "scale_factor=5" in text and "12x12" in text and "[1, 2, 3, 4, 6, 12]" in text


def test_connector_rejects_non_square_or_indivisible_grids():
    conn = connector(scale=2, grid=8)
    with pytest.raises(SpecError, match="square grid"):
        conn(torch.randn(1, 60, 48))
    with pytest.raises(SpecError, match=r"valid scales: \[1, 3, 9\]"):
        conn(torch.randn(1, 81, 48))
    assert isinstance(pytest.raises(VlmkitError, conn, torch.randn(1, 7, 48)).value, SpecError)
    assert conn(torch.randn(2, 144, 48)).shape == (2, 36, 32)  # a bigger square grid works too


def test_patch_mask_shape_checked():
    vt = tower(NavitVisionTower)
    with pytest.raises(ProcessorError, match=r"expected \(2, 8, 8\)"):
        vt(torch.randn(2, 3, 64, 64), torch.ones(2, 8, 7, dtype=torch.bool))


# --------------------------------------------------------------------------- param counts


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_param_counts_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector as HFConnector
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

    assert _count(tower(NavitVisionTower)) == _count(Idefics3VisionTransformer(transformers.Idefics3VisionConfig(**TINY)))
    hf_siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY, vision_use_head=False))
    assert _count(tower(SiglipVisionTower)) == _count(hf_siglip)
    cfg = transformers.Idefics3Config(vision_config=TINY, scale_factor=2, text_config=dict(
        model_type="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=4))
    assert _count(connector(scale=2, grid=8)) == _count(HFConnector(cfg))
    assert _count(HiddenAlign(HiddenAlign.Params(), in_features=8, out_features=8)) == 0
    assert _count(HiddenAlign(HiddenAlign.Params(), in_features=8, out_features=6)) == 48


def test_checkpoint_names_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

    from vlmkit.family import family_for_config

    smol = family_for_config({"model_type": "idefics3"})
    siglip_family = family_for_config({"model_type": "siglip"})
    hf_navit = Idefics3VisionTransformer(transformers.Idefics3VisionConfig(**TINY))
    assert set(tower(NavitVisionTower).key_map().checkpoint_keys()) == set(hf_navit.state_dict())
    assert set(smol.key_map("vision_tower", tower(NavitVisionTower).key_map()).checkpoint_keys()) == {
        "model.vision_model." + k for k in hf_navit.state_dict()
    }
    hf_siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY, vision_use_head=False))
    siglip_map = tower(SiglipVisionTower).key_map()
    published = {"vision_model." + k for k in hf_siglip.state_dict()}  # SiglipModel / transformers 4.x files
    assert set(siglip_family.key_map("vision_tower", siglip_map, published).checkpoint_keys()) == published
    bare = set(hf_siglip.state_dict())  # a SiglipVisionModel saved by transformers 5
    assert set(siglip_family.key_map("vision_tower", siglip_map, bare).checkpoint_keys()) == bare
    assert smol.key_map("connector", connector().key_map()).checkpoint_keys() == ["model.connector.modality_projection.proj.weight"]
    align = HiddenAlign(HiddenAlign.Params(), in_features=4, out_features=6).key_map()
    assert smol.key_map("aligner", align).checkpoint_keys() == ["model.aligner.proj.weight"]


# --------------------------------------------------------------------------- key maps, meta build


def _all_components():
    return [
        tower(NavitVisionTower),
        tower(SiglipVisionTower),
        connector(),
        HiddenAlign(HiddenAlign.Params(), in_features=32, out_features=40),
        HiddenAlign(HiddenAlign.Params(), in_features=32, out_features=32),
    ]


@pytest.mark.parametrize("index", range(5), ids=["navit", "siglip", "idefics3", "align-linear", "align-identity"])
def test_key_map_covers_state_dict_and_round_trips(index):
    comp = _all_components()[index]
    sd = comp.state_dict()
    km = comp.key_map()
    assert [r.local for r in km] == list(sd)
    exported = km.export(sd)
    assert sorted(exported) == sorted(km.checkpoint_keys())
    back = {r.local: torch.cat([exported[s] for s in r.sources]) for r in km}
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("index", range(5), ids=["navit", "siglip", "idefics3", "align-linear", "align-identity"])
def test_meta_build_then_assign_load(index):
    real = _all_components()[index].eval()
    with torch.device("meta"):
        lazy = _all_components()[index].eval()
    assert list(lazy.buffers()) == [] and list(real.buffers()) == []
    assert all(p.is_meta for p in lazy.parameters())
    lazy.load_state_dict(real.state_dict(), assign=True, strict=True)
    assert not any(p.is_meta for p in lazy.parameters())
    x = torch.randn(2, 3, 64, 64) if index < 2 else torch.randn(2, 64, 48) if index == 2 else torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(lazy(x), real(x))


# --------------------------------------------------------------------------- protocols, registration, dtypes


def test_protocols_and_attributes():
    for cls in (NavitVisionTower, SiglipVisionTower):
        vt = tower(cls)
        assert isinstance(vt, VisionTower)
        assert (vt.hidden_size, vt.patch_size, vt.image_size, vt.num_patches_per_side) == (48, 8, 64, 8)
        assert vt.params.hidden_size == 48
    conn = connector(scale=4, grid=8)
    assert isinstance(conn, Connector) and (conn.tokens_per_image, conn.out_features) == (4, 32)
    assert isinstance(HiddenAlign(HiddenAlign.Params(), in_features=3, out_features=3), Aligner)


def test_each_module_registers_its_component():
    registry = Registry()
    for module in (navit, siglip, idefics3_connector, hidden_align):
        registry.current_plugin = module.__name__
        module.vlmkit_register_components(registry)
    assert registry.get("vision_tower", "navit").cls is NavitVisionTower
    assert registry.get("vision_tower", "siglip").cls is SiglipVisionTower
    assert registry.get("connector", "idefics3").cls is Idefics3Connector
    assert registry.get("aligner", "hidden_align").cls is HiddenAlign
    # siglip imports navit's layers but must not re-export navit's hook (pluggy would run it twice)
    assert siglip.vlmkit_register_components is not navit.vlmkit_register_components


@pytest.mark.parametrize("cls", [NavitVisionTower, SiglipVisionTower])
def test_output_shapes_bf16_and_training_step(cls):
    vt = tower(cls, attention_dropout=0.1)
    mask = torch.ones(2, 10, 8, dtype=torch.bool)
    mask[0, 6:] = False
    out = vt(torch.randn(2, 3, 80, 64), mask)
    assert out.shape == (2, 80, 48)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in vt.parameters())
    vt = vt.to(torch.bfloat16).eval()
    with torch.no_grad():
        out = vt(torch.randn(1, 3, 72, 64))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 72, 48) and torch.isfinite(out).all()


def test_all_padding_image_stays_finite():
    vt = tower(NavitVisionTower).eval()
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = vt(torch.randn(2, 3, 64, 64), mask)
    assert torch.isfinite(out).all()
