"""The processor of a spec is built from the components' declared facts (vlmkit.facts), not by
assembling the model: the same settings as assembling on the meta device gave, no backbone
built, and assemble() holding the instances to the same facts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from pydantic import BaseModel, ConfigDict

import vlmkit
from vlmkit import facts, plugins
from vlmkit.errors import PluginError, SpecError
from vlmkit.keymap import KeyMap
from vlmkit.protocols import SLOTS, TowerGeometry
from vlmkit.wiring import assemble

from ..conftest import BUNDLED, REPO

TOKENIZER = str(BUNDLED / "SmolVLM-256M-Instruct")
LLAMA = {"name": "llama", "vocab_size": 49280, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2}  # fmt: skip
SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
TOWERS = {
    "navit": ({"name": "navit", **SMALL, "image_size": 64, "patch_size": 8}, {"name": "idefics3", "scale_factor": 2}),
    "siglip": ({"name": "siglip", **SMALL, "image_size": 48, "patch_size": 8}, {"name": "idefics3", "scale_factor": 3}),
    "clip-full": ({"name": "clip", **SMALL, "image_size": 40, "patch_size": 8, "vision_feature_layer": [-1, -2],
                   "vision_feature_select_strategy": "full"}, {"name": "mlp"}),
    "clip-default": ({"name": "clip", **SMALL, "image_size": 32, "patch_size": 8}, {"name": "mlp"}),
    "timm": ({"name": "timm", "model_name": "vit_small_patch16_224", "img_size": 64,
              "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}, {"name": "idefics3", "scale_factor": 2}),
}  # fmt: skip


def _spec(tower: dict, connector: dict, backbone: dict | None = None, **packer):
    return vlmkit.spec.validate_spec({
        "vision_tower": tower, "connector": connector,
        "packer": {"name": "image_packer", "image_token_id": 49190, **packer},
        "backbone": backbone or LLAMA, "tokenizer": TOKENIZER,
    })  # fmt: skip


def _assembled_settings(spec):
    """What load_processor(spec=) gave before: the spec assembled on the meta device, read off the instances."""
    base = vlmkit.load_processor(TOKENIZER).settings
    model = assemble(spec, meta_slots=frozenset(SLOTS))
    tower = model.vision_tower
    updates = {"tile": tower.image_size, "longest_edge": max(1, base.longest_edge // base.tile) * tower.image_size}
    for field, attr in (("mean", "image_mean"), ("std", "image_std")):
        if getattr(tower, attr, None) is not None:
            updates[field] = tuple(float(v) for v in getattr(tower, attr))
    return dataclasses.replace(base, **updates), model.packer.tokens_per_image, model.packer.image_token_id


@pytest.mark.parametrize("kind", list(TOWERS))
def test_processor_from_facts_equals_the_assembled_one(kind):
    if kind == "timm":
        pytest.importorskip("vlmkit_timm")
    spec = _spec(*TOWERS[kind])
    settings, tokens, token_id = _assembled_settings(spec)
    proc = vlmkit.load_processor(spec=spec)
    assert (proc.settings, proc.image_seq_len, proc.image_token_id) == (settings, tokens, token_id)
    if kind == "timm":  # the one tower that declares mean/std (timm's pretrained_cfg)
        assert proc.settings.mean == (0.5, 0.5, 0.5)
    if kind == "clip-full":  # the kept class token is one more visual token
        assert proc.image_seq_len == (40 // 8) ** 2 + 1


@pytest.mark.parametrize("kind", list(TOWERS))
def test_declared_geometry_is_the_instances(kind):
    if kind == "timm":
        pytest.importorskip("vlmkit_timm")
    spec = _spec(*TOWERS[kind])
    tower = facts.make_component(spec, "vision_tower", meta=True)
    assert type(tower).geometry(spec.vision_tower.params) == facts.geometry_of(tower)
    geometry = facts.tower_geometry(spec)
    conn = facts.make_component(spec, "connector", True, in_features=geometry.hidden_size,
                                grid=geometry.num_patches_per_side, out_features=16,
                                **({} if geometry.num_tokens is None else {"num_tokens": geometry.num_tokens}))  # fmt: skip
    assert facts.connector_tokens(spec, geometry) == conn.tokens_per_image


def _hf_backbone_spec():
    text = {"model_type": "llama", "vocab_size": 49280, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    return _spec(*TOWERS["navit"], backbone={"name": "hf_causal_lm", "config": text})


def test_hf_causal_lm_backbone_is_not_built_for_a_processor(monkeypatch):
    import transformers

    spec = _hf_backbone_spec()
    calls = []
    real = transformers.AutoModelForCausalLM.from_config
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda *a, **k: calls.append(a) or real(*a, **k))  # fmt: skip
    proc = vlmkit.load_processor(spec=spec)
    assert calls == [] and proc.image_seq_len == 16  # (64 / 8 / 2) ** 2
    assert facts.spec_facts(spec).vocab_size == 49280  # the text config's, through HFCausalLMBackbone.widths
    vlmkit.build(spec, load_weights=False)  # the spy sees a real build: the check above can fail
    assert calls  # (twice: the meta-device size check, then the real build)


def test_a_processor_builds_no_hf_model_in_a_fresh_process():
    code = (
        "import sys, vlmkit, transformers\n"
        "from tests.unit.test_spec_facts import _hf_backbone_spec\n"
        "built = []\n"
        "orig = transformers.AutoModelForCausalLM.from_config\n"
        "transformers.AutoModelForCausalLM.from_config = lambda *a, **k: built.append(1) or orig(*a, **k)\n"
        "proc = vlmkit.load_processor(spec=_hf_backbone_spec())\n"
        "print(len(built), 'transformers.models.llama.modeling_llama' in sys.modules, proc.image_seq_len)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False", "16"]  # no model built, llama's modeling code never imported


class _QuietTower(torch.nn.Module):
    """A third-party tower that declares nothing: facts build it alone on the meta device."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        image_size: int = 32
        patch_size: int = 8
        lie: bool = False

    def __init__(self, params):
        super().__init__()
        self.params = params
        self.hidden_size, self.image_size, self.patch_size = 12, params.image_size, params.patch_size
        self.num_patches_per_side = params.image_size // params.patch_size
        self.image_mean = self.image_std = (0.25, 0.25, 0.25)
        self.proj = torch.nn.Conv2d(3, 12, params.patch_size, params.patch_size)

    def key_map(self) -> KeyMap:
        return KeyMap.prefixed(self.state_dict().keys(), "")

    def forward(self, pixel_values, patch_attention_mask=None):
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class _LyingTower(_QuietTower):
    """Declares a geometry its instances do not have (when ``lie``)."""

    @classmethod
    def geometry(cls, params):
        side = params.image_size * (2 if params.lie else 1)
        return TowerGeometry(side, params.patch_size, side // params.patch_size, 12, None, (0.25,) * 3, (0.25,) * 3)


class _Plugin:
    @vlmkit.hookimpl
    def vlmkit_register_components(self, registry):
        registry.add_vision_tower("facts_quiet", _QuietTower)
        registry.add_vision_tower("facts_lying", _LyingTower)


@pytest.fixture
def third_party():
    name = plugins.register_plugin(_Plugin(), name="facts-test")
    yield
    plugins.unregister_plugin(name)


def test_undeclared_tower_is_built_alone_on_meta(third_party, monkeypatch):
    from vlmkit.components.llama import LlamaBackbone

    spec = _spec({"name": "facts_quiet"}, {"name": "idefics3", "scale_factor": 2})
    expected = _assembled_settings(spec)
    monkeypatch.setattr(LlamaBackbone, "__init__", lambda *a, **k: pytest.fail("the backbone was built"))
    proc = vlmkit.load_processor(spec=spec)
    assert (proc.settings, proc.image_seq_len, proc.image_token_id) == expected
    assert proc.settings.mean == (0.25, 0.25, 0.25) and proc.image_seq_len == 4


def test_assemble_refuses_a_tower_whose_instance_breaks_its_declaration(third_party):
    honest = _spec({"name": "facts_lying"}, {"name": "idefics3", "scale_factor": 2})
    assert assemble(honest, meta_slots=frozenset(SLOTS)).packer.tokens_per_image == 4
    lying = _spec({"name": "facts_lying", "lie": True}, {"name": "idefics3", "scale_factor": 2})
    with pytest.raises(PluginError, match=r"facts_lying.*image_size 64 vs 32"):
        assemble(lying, meta_slots=frozenset(SLOTS))


def test_bad_facts_are_spec_errors_naming_the_key():
    with pytest.raises(SpecError, match="scale_factor=3 does not divide") as info:
        vlmkit.load_processor(spec=_spec(*TOWERS["navit"][:1], {"name": "idefics3", "scale_factor": 3}))
    assert info.value.key_path == "connector.scale_factor"
    with pytest.raises(SpecError, match="packer.tokens_per_image is 7"):
        vlmkit.load_processor(spec=_spec(*TOWERS["navit"], tokens_per_image=7))
    with pytest.raises(SpecError, match="outside the backbone vocabulary"):
        facts.spec_facts(_spec(*TOWERS["navit"], backbone={**LLAMA, "vocab_size": 100}))


def test_building_on_the_meta_device_fills_nothing_and_imports_no_dynamo():
    """Meta tensors have no values, so torch.nn.init's initialisers and random fills skip them
    inside ValuelessInit (torch's meta normal_ imports torch._dynamo, ~2 s, on its first call);
    real tensors in the same context are filled as usual. In a fresh process, a whole model built
    from the bundled SmolVLM-256M config on the meta device leaves torch._dynamo unimported."""
    with torch.device("meta"), facts.ValuelessInit():
        emb = torch.nn.Embedding(8, 4)
        lin = torch.nn.Linear(4, 4)
        torch.nn.init.trunc_normal_(lin.weight, std=0.02)
        lin.weight.normal_()
    assert emb.weight.is_meta and lin.weight.is_meta and emb.weight.shape == (8, 4)
    real = torch.zeros(64)
    with facts.ValuelessInit():
        torch.nn.init.normal_(real)
        real.uniform_(5.0, 6.0)
    assert real.min() >= 5.0  # filled: the context only skips meta tensors

    code = (
        "import sys, vlmkit.hf, vlmkit.wiring, vlmkit.protocols\n"
        f"spec = vlmkit.hf.spec_from_hf({TOKENIZER!r})\n"
        "model = vlmkit.wiring.assemble_within_memory(spec, frozenset(vlmkit.protocols.SLOTS))  # build_from_hf's first step\n"
        "print(sum(p.numel() for p in model.parameters()) > 2e8, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]
