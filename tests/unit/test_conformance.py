"""Every built-in component passes the conformance kit (:mod:`vlmkit.testing`).

The sweep is automatic, like timm's tests over its registry: each component registered by vlmkit
itself is checked with the tiny params in :data:`TINY`. A built-in without an entry there fails,
so a new built-in must add its tiny params. (Third-party plugins run the kit in their own tests.)
"""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict

import vlmkit
from vlmkit import plugins, testing
from vlmkit.keymap import KeyMap

#: (slot, registry name) -> tiny params, plus optional "dims" for the check function.
TINY: dict[tuple[str, str], dict] = {
    ("vision_tower", "navit"): {"params": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "image_size": 16, "patch_size": 4}},
    ("vision_tower", "siglip"): {"params": {"hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 1,
                                            "num_attention_heads": 3, "image_size": 12, "patch_size": 4,
                                            "hidden_act": "gelu"}},
    ("vision_tower", "clip"): {"params": {"hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
                                          "num_attention_heads": 3, "image_size": 12, "patch_size": 4}},
    ("connector", "mlp"): {"params": {}, "dims": {"in_features": 8, "grid": 3, "out_features": 12}},
    ("connector", "idefics3"): {"params": {"scale_factor": 2}, "dims": {"in_features": 8, "grid": 4, "out_features": 12}},
    ("aligner", "hidden_align"): {"params": {}},
    ("packer", "image_packer"): {"params": {"image_token_id": 7}, "dims": {"tokens_per_image": 3}},
    ("backbone", "llama"): {"params": {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
                                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}},
    ("backbone", "llama", "tied"): {"params": {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
                                               "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "tie_word_embeddings": True, "attention_bias": True}},
    ("backbone", "hf_causal_lm"): {"params": {"config": {"model_type": "llama", "vocab_size": 40, "hidden_size": 16,
                                                         "intermediate_size": 24, "num_hidden_layers": 1,
                                                         "num_attention_heads": 2, "num_key_value_heads": 1}}},
}  # fmt: skip


def _builtin_entries():
    sources = plugins.plugin_sources()
    return [e for e in plugins.get_registry().entries() if sources.get(e.plugin) == "vlmkit"]


def _cases():
    cases = []
    for entry in _builtin_entries():
        keys = [k for k in TINY if k[:2] == (entry.slot, entry.name)] or [(entry.slot, entry.name)]
        cases += [pytest.param(entry, key, id="/".join(key)) for key in keys]
    return cases


@pytest.mark.parametrize(("entry", "key"), _cases())
def test_builtin_conforms(entry, key):
    if key not in TINY:
        pytest.fail(
            f"built-in {entry.slot} {entry.name!r} ({entry.plugin}) has no tiny params in "
            f"tests/unit/test_conformance.py::TINY; add some so the conformance kit checks it"
        )
    case = TINY[key]
    testing.check_component(entry.slot, entry.cls, case["params"], name=entry.name, **case.get("dims", {}))


def test_tiny_table_names_only_registered_builtins():
    names = {(e.slot, e.name) for e in _builtin_entries()}
    stale = sorted(k for k in TINY if k[:2] not in names)
    assert not stale, f"TINY has params for components that are not registered built-ins: {stale}"


# ---- the kit itself catches broken components ----------------------------------------------------
class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = 8


class _GoodTower(torch.nn.Module):
    Params = _Params

    def __init__(self, params):
        super().__init__()
        self.params = params
        self.hidden_size, self.patch_size, self.image_size, self.num_patches_per_side = params.hidden_size, 4, 8, 2
        self.proj = torch.nn.Conv2d(3, params.hidden_size, 4, 4)

    def forward(self, pixel_values, patch_attention_mask=None):
        return self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)

    def key_map(self) -> KeyMap:
        return KeyMap.prefixed(self.state_dict().keys(), "tiny.")


class _FloatOut(_GoodTower):
    def forward(self, pixel_values, patch_attention_mask=None):
        return super().forward(pixel_values).float()


class _PartialMap(_GoodTower):
    def key_map(self) -> KeyMap:
        return KeyMap.prefixed(["proj.weight"], "tiny.")


class _DeadHead(_GoodTower):
    def __init__(self, params):
        super().__init__(params)
        self.head = torch.nn.Linear(params.hidden_size, 3)


class _WrongShape(_GoodTower):
    def forward(self, pixel_values, patch_attention_mask=None):
        return super().forward(pixel_values)[:, :1]


class _MetaBuffer(_GoodTower):
    def __init__(self, params):
        super().__init__(params)
        self.register_buffer("scale", torch.ones(1), persistent=False)

    def forward(self, pixel_values, patch_attention_mask=None):
        return super().forward(pixel_values) * self.scale.to(self.proj.weight.dtype)


def test_kit_accepts_an_unregistered_good_tower():
    testing.check_vision_tower(_GoodTower, {"hidden_size": 8})
    with pytest.raises(vlmkit.errors.UnknownComponentError):  # the temporary registration is gone
        plugins.get_registry().get("vision_tower", "conformance-_GoodTower")


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_FloatOut, "output dtype"),
        (_PartialMap, "no rule for state_dict keys"),
        (_DeadHead, "get no gradient"),
        (_WrongShape, "returned shape"),
        (_MetaBuffer, "still on meta"),
    ],
)
def test_kit_rejects_broken_towers(cls, message):
    with pytest.raises(AssertionError, match=message):
        testing.check_vision_tower(cls, {"hidden_size": 8}, build=False)
