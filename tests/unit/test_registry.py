"""The plugin registry: built-ins, duplicates, unknown names, a throwaway plugin."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict

import vlmkit
from vlmkit import plugins
from vlmkit.errors import PluginError, UnknownComponentError
from vlmkit.keymap import KeyMap


class _TinyTower(torch.nn.Module):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        hidden_size: int = 8
        image_size: int = 16
        patch_size: int = 4

    def __init__(self, params):
        super().__init__()
        self.params = params
        self.hidden_size, self.image_size, self.patch_size = params.hidden_size, params.image_size, params.patch_size
        self.num_patches_per_side = params.image_size // params.patch_size
        self.proj = torch.nn.Conv2d(3, params.hidden_size, params.patch_size, params.patch_size)

    def key_map(self) -> KeyMap:
        return KeyMap.prefixed(self.state_dict().keys(), "tiny.")

    def forward(self, pixel_values, patch_attention_mask=None):
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class _ThrowawayPlugin:
    @vlmkit.hookimpl
    def vlmkit_register_components(self, registry):
        registry.add_vision_tower("tiny_test_tower", _TinyTower)


class _DuplicatePlugin:
    @vlmkit.hookimpl
    def vlmkit_register_components(self, registry):
        registry.add_vision_tower("navit", _TinyTower)


def test_builtins_registered_with_their_module():
    reg = plugins.get_registry()
    for slot, name in [("vision_tower", "navit"), ("vision_tower", "siglip"), ("connector", "idefics3"),
                       ("aligner", "hidden_align"), ("packer", "image_packer"), ("backbone", "llama")]:
        entry = reg.get(slot, name)
        assert entry.plugin.startswith("vlmkit.components."), entry
    assert plugins.plugin_sources()["vlmkit.components.navit"] == "vlmkit"


def test_unknown_name_lists_choices_and_suggests():
    with pytest.raises(UnknownComponentError) as info:
        plugins.get_registry().get("vision_tower", "navitt")
    msg = str(info.value)
    assert "navitt" in msg and "navit" in msg and "siglip" in msg and "Did you mean 'navit'" in msg


def test_throwaway_plugin_registers_and_builds():
    name = plugins.register_plugin(_ThrowawayPlugin(), name="throwaway")
    try:
        entry = plugins.get_registry().get("vision_tower", "tiny_test_tower")
        assert entry.plugin == "throwaway"
        spec = vlmkit.spec_from_hf  # noqa: F841 - API presence
        data = {
            "vision_tower": {"name": "tiny_test_tower"},
            "connector": {"name": "idefics3", "scale_factor": 2},
            "packer": {"name": "image_packer", "image_token_id": 5},
            "backbone": {"name": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                         "num_hidden_layers": 1, "num_attention_heads": 2},
        }
        model = vlmkit.build(data, load_weights=False)
        assert model.packer.tokens_per_image == 4
        assert model.aligner.__class__.__name__ == "HiddenAlign"
    finally:
        plugins.unregister_plugin(name)
    with pytest.raises(UnknownComponentError):
        plugins.get_registry().get("vision_tower", "tiny_test_tower")


def test_duplicate_name_raises_naming_both_owners():
    with pytest.raises(PluginError) as info:
        plugins.register_plugin(_DuplicatePlugin(), name="dupe")
    msg = str(info.value)
    assert "'navit'" in msg and "vlmkit.components.navit" in msg and "dupe" in msg
    # the failed plugin left nothing behind
    assert plugins.get_registry().get("vision_tower", "navit").plugin == "vlmkit.components.navit"
    assert plugins.get_plugin_manager().get_plugin("dupe") is None


def test_component_without_params_is_refused():
    class Bad:
        @vlmkit.hookimpl
        def vlmkit_register_components(self, registry):
            registry.add_connector("bad", torch.nn.Linear)

    with pytest.raises(PluginError, match="Params"):
        plugins.register_plugin(Bad(), name="bad")


def test_plugin_manager_is_lazy():
    import subprocess
    import sys

    code = "import vlmkit, sys; from vlmkit import plugins; print(plugins._state.pm is None, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


class _HalfBrokenPlugin:
    """Registers one tower, then fails: nothing of it may stay registered."""

    @vlmkit.hookimpl
    def vlmkit_register_components(self, registry):
        registry.add_vision_tower("half_broken_tower", _TinyTower)
        raise RuntimeError("boom after one registration")


def test_entry_point_plugin_failing_midway_leaves_nothing(monkeypatch):
    import importlib.metadata as md

    class _Dist:
        name = "half-broken-dist"

    class _EP:
        name, dist, group = "half_broken", _Dist(), "vlmkit"

        def load(self):
            return _HalfBrokenPlugin()

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda **kw: [_EP()] if kw.get("group") == "vlmkit" else real(**kw))
    plugins.reset()
    try:
        reg = plugins.get_registry()
        fails = plugins.failures()
        assert [(f.name, f.distribution) for f in fails] == [("half_broken", "half-broken-dist")]
        assert "boom after one registration" in fails[0].error
        assert "half_broken_tower" not in reg.names("vision_tower")
        assert "navit" in reg.names("vision_tower")  # everything else keeps working
    finally:
        monkeypatch.undo()
        plugins.reset()


def test_runtime_plugin_raising_becomes_a_plugin_error():
    class Raising:
        @vlmkit.hookimpl
        def vlmkit_register_components(self, registry):
            registry.add_vision_tower("raising_tower", _TinyTower)
            raise TypeError("bad plugin code")

    with pytest.raises(PluginError, match="TypeError: bad plugin code"):
        plugins.register_plugin(Raising(), name="raising")
    assert "raising_tower" not in plugins.get_registry().names("vision_tower")
