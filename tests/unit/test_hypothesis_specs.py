"""Property: a mutated config.json or model YAML gives a working model or a VlmkitError -- never
another exception type (no raw pydantic / torch / json / yaml / KeyError / TypeError...).

The base config is SmolVLM-256M-Instruct's published config.json shrunk to tiny, consistent sizes,
so a surviving mutation builds (and runs one forward pass) in milliseconds. Mutations drop keys
and sections, retype values (ints to negative / zero / huge / str / None / float / list; sections
to lists), nudge numbers so they stop dividing each other, and add unknown keys. A spec that
validates but would be big is measured on the meta device and not built beyond ``PARAM_BUDGET``.

Profiles: ``vlmkit-ci`` (default) is derandomized, so CI runs the same examples every time;
set ``VLMKIT_HYPOTHESIS=dev`` for fresh random examples and more of them.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import vlmkit
from vlmkit.builder import assemble
from vlmkit.errors import VlmkitError
from vlmkit.protocols import SLOTS

from ..conftest import BUNDLED

settings.register_profile(
    "vlmkit-ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)  # fmt: skip
settings.register_profile(
    "vlmkit-dev", derandomize=False, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)  # fmt: skip
PROFILE = settings.get_profile("vlmkit-dev" if os.environ.get("VLMKIT_HYPOTHESIS") == "dev" else "vlmkit-ci")
SCALE = 4 if os.environ.get("VLMKIT_HYPOTHESIS") == "dev" else 1

#: Build (fresh init, on the CPU) only specs up to this many parameters; bigger ones are checked
#: on the meta device only.
PARAM_BUDGET = 2_000_000
#: Run a forward pass only up to this many patches per image.
PATCH_BUDGET = 256
MAX_DEPTH = 4


# ---------------------------------------------------------------------------- the pipeline
def _too_deep(spec) -> bool:
    for slot in SLOTS:
        for key, value in getattr(spec, slot).params:
            if key.startswith("num_") and key.endswith("layers") and isinstance(value, int) and value > MAX_DEPTH:
                return True
    return False


def _forward(model) -> None:
    """One forward pass with one image at the tower's size (or text only when no image fits)."""
    tower, packer, vocab = model.vision_tower, model.packer, model.backbone.vocab_size
    grid = tower.image_size // tower.patch_size
    text = [i for i in range(min(vocab, 8)) if i != packer.image_token_id][:3]
    pixels = None
    ids = list(text)
    if grid * grid <= PATCH_BUDGET and packer.tokens_per_image <= 256:
        side = grid * tower.patch_size
        channels = getattr(tower.params, "num_channels", 3)
        pixels = torch.randn(1, 1, channels, side, side, generator=torch.Generator().manual_seed(0))
        ids = [packer.image_token_id] * packer.tokens_per_image + ids
    if not ids:
        return
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids, pixel_values=pixels)
    assert out.logits.shape == (1, len(ids), vocab)


def check(make_spec) -> str:
    """Run ``make_spec()`` -> build -> forward; returns what happened. Only VlmkitError may escape
    as an error (it is caught and reported as ``"error"``)."""
    try:
        spec = make_spec()
        if _too_deep(spec):
            return "too deep to build here"
        size = sum(p.numel() for p in assemble(spec, meta_slots=frozenset(SLOTS)).parameters())
        if size > PARAM_BUDGET:
            return "too big to build here"
        model = vlmkit.build(spec, load_weights=False)
        _forward(model)
        return "ok"
    except VlmkitError as exc:
        assert str(exc).strip(), "a VlmkitError must say something"
        return "error"


# ---------------------------------------------------------------------------- base files
def tiny_config() -> dict[str, Any]:
    """SmolVLM-256M-Instruct's config.json with tiny, consistent sizes (4 visual tokens per image)."""
    config = json.loads((BUNDLED / "SmolVLM-256M-Instruct" / "config.json").read_text())
    config.update(image_token_id=100, scale_factor=2, vocab_size=128)
    config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   image_size=64, patch_size=16)  # fmt: skip
    config["text_config"].update(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, pixel_shuffle_factor=2,
                                 max_position_embeddings=256, pad_token_id=2)  # fmt: skip
    config["text_config"]["perceiver_config"]["resampler_n_latents"] = 4
    return config


TINY_CONFIG = tiny_config()
PROCESSOR_CONFIG = {"image_seq_len": 4, "processor_class": "Idefics3Processor"}

TINY_YAML: dict[str, Any] = {
    "vision_tower": {"name": "navit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
    "connector": {"name": "idefics3", "scale_factor": 2},
    "aligner": {"name": "hidden_align"},
    "packer": {"name": "image_packer", "image_token_id": 100, "tokens_per_image": 4},
    "backbone": {"name": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "eos_token_id": [2, 3]},
    "freeze": ["vision_tower"],
    "weights": "some/where",
}  # fmt: skip


def _paths(data: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in data.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_paths(value, (*prefix, key)))
    return out


_RELEVANT_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                  "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "pad_token_id", "bos_token_id",
                  "eos_token_id", "pixel_shuffle_factor", "perceiver_config", "model_type", "tie_word_embeddings")  # fmt: skip
_RELEVANT_VISION = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                    "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")  # fmt: skip
CONFIG_PATHS = sorted(
    [(k,) for k in TINY_CONFIG]
    + [("text_config", k) for k in _RELEVANT_TEXT]
    + [("vision_config", k) for k in _RELEVANT_VISION]
    + [("text_config", "perceiver_config", "resampler_n_latents"), ("processor", "image_seq_len")]
)
YAML_PATHS = sorted(_paths(TINY_YAML))

# ---------------------------------------------------------------------------- mutations
INTS = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([-(2**63), -1, 0, 1, 2, 3, 5, 7, 9, 48, 127, 128, 129, 10**6, 10**9, 2**31, 2**63, 10**30]),
)
VALUES = st.one_of(
    INTS,
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.5, 2.0, -1.0, 1e-30, 1e30]),
    st.text(max_size=6),
    st.sampled_from(["llama", "mistral", "idefics3", "gelu", "silu", "navit", "siglip", "", "16", "auto"]),
    st.none(),
    st.booleans(),
    st.lists(st.one_of(st.integers(-2, 200), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.sampled_from(["rope_type", "factor", "type", "x"]), st.one_of(st.integers(-1, 4), st.text(max_size=5)), max_size=3),
)


def _mutation(paths: list[tuple]):
    path = st.sampled_from(paths)
    return st.one_of(
        st.tuples(st.just("set"), path, VALUES),
        st.tuples(st.just("nudge"), path, st.sampled_from([-2, -1, 1, 2, 3])),
        st.tuples(st.just("scale"), path, st.sampled_from([0, 2, 3, 10**4, -1])),
        st.tuples(st.just("delete"), path, st.none()),
        st.tuples(st.just("to_list"), path, st.none()),
        st.tuples(st.just("add_unknown"), path, VALUES),
    )


def _apply(data: dict, mutation) -> None:
    op, path, arg = mutation
    parent = data
    for key in path[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            return
    key = path[-1]
    if op == "set":
        parent[key] = arg
    elif op == "delete":
        parent.pop(key, None)
    elif key not in parent:
        return
    elif op == "nudge" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] + arg
    elif op == "scale" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * arg
    elif op == "to_list":
        value = parent[key]
        parent[key] = list(value.values()) if isinstance(value, dict) else [value]
    elif op == "add_unknown" and isinstance(parent[key], dict):
        parent[key]["not_a_real_key"] = arg


def _write_checkpoint(folder: Path, mutations) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    files = {"config.json": config, "processor_config.json": copy.deepcopy(PROCESSOR_CONFIG)}
    for mutation in mutations:
        if mutation[1][0] == "processor":
            _apply(files["processor_config.json"], (mutation[0], mutation[1][1:], mutation[2]))
        else:
            _apply(config, mutation)
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data))


# ---------------------------------------------------------------------------- the properties
def test_unmutated_bases_build_and_run():
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(Path(tmp), [])
        assert check(lambda: vlmkit.spec_from_hf(tmp)) == "ok"
    assert check(lambda: vlmkit.spec.validate_spec(copy.deepcopy(TINY_YAML))) == "ok"
    assert sum(p.numel() for p in vlmkit.build(copy.deepcopy(TINY_YAML), load_weights=False).parameters()) < PARAM_BUDGET


@settings(PROFILE, max_examples=150 * SCALE)
@given(st.lists(_mutation(CONFIG_PATHS), min_size=1, max_size=3))
@example([("set", ("vision_config",), [1, 2])])
@example([("delete", ("text_config",), None)])
@example([("set", ("model_type",), ["idefics3"])])
@example([("set", ("text_config", "num_hidden_layers"), 10**9)])
@example([("set", ("vision_config", "image_size"), 10**9)])
@example([("set", ("vision_config", "image_size"), 3 * 10**12 + 48), ("set", ("scale_factor",), 5)])
@example([("set", ("vision_config", "hidden_size"), 10**30 + 1)])
@example([("set", ("text_config", "num_attention_heads"), 10**15), ("set", ("text_config", "num_key_value_heads"), 7)])
@example([("set", ("text_config", "intermediate_size"), 10**30)])
@example([("set", ("text_config", "model_type"), "mistral")])
@example([("set", ("processor", "image_seq_len"), "4")])
@example([("nudge", ("text_config", "hidden_size"), 1)])
@example([("set", ("vision_config", "patch_size"), 15)])
@example([("set", ("text_config", "rope_scaling"), {"rope_type": "x"})])
def test_mutated_config_json(mutations):
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(Path(tmp), mutations)
        check(lambda: vlmkit.spec_from_hf(tmp))


@settings(PROFILE, max_examples=150 * SCALE)
@given(st.lists(_mutation(YAML_PATHS), min_size=1, max_size=3))
@example([("to_list", ("connector",), None)])
@example([("delete", ("backbone",), None)])
@example([("set", ("vision_tower", "name"), 5)])
@example([("set", ("backbone", "num_hidden_layers"), 10**9)])
@example([("set", ("vision_tower", "hidden_size"), 10**30 + 1)])
@example([("set", ("backbone", "num_attention_heads"), 10**15), ("set", ("backbone", "num_key_value_heads"), 7)])
@example([("set", ("packer", "tokens_per_image"), 5)])
@example([("add_unknown", ("backbone",), 1)])
@example([("set", ("weights",), {"tower": "x"})])
def test_mutated_yaml(mutations):
    data = copy.deepcopy(TINY_YAML)
    for mutation in mutations:
        _apply(data, mutation)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        check(lambda: vlmkit.load_yaml(path))


@settings(PROFILE, max_examples=60 * SCALE)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80)))
@example("vision_tower: !!python/object/apply:os.system ['echo hi']")
@example("a: &a [1, 2]\nb: [*a, *a, *a]\nvision_tower: *a\n")
@example("[" * 2000)
@example(b"\xff\xfe")
def test_arbitrary_yaml_text(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.yaml"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        check(lambda: vlmkit.load_yaml(path))


@settings(PROFILE, max_examples=60 * SCALE)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80)))
@example("[" * 50000)
@example('{"model_type": "idefics3", "vision_config": {}, "text_config": {}}')
def test_arbitrary_config_json_text(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        check(lambda: vlmkit.spec_from_hf(tmp))


@pytest.mark.parametrize("paths", [CONFIG_PATHS, YAML_PATHS], ids=["config", "yaml"])
def test_mutation_paths_cover_the_sections(paths):
    roots = {p[0] for p in paths}
    assert roots >= ({"vision_config", "text_config", "scale_factor"} if paths is CONFIG_PATHS else set(SLOTS))
