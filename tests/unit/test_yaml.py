"""YAML assembly: every shipped config builds, YAML round-trips, bad YAML is a SpecError."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import vlmkit
from vlmkit.errors import SpecError, UnknownComponentError

from ..conftest import REPO, published_folder

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"smolvlm-256m.yaml", "smolvlm-500m.yaml"} <= names
    assert len(names) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_builds_without_weights(path):
    spec = vlmkit.load_yaml(path)
    model = vlmkit.build(spec, load_weights=False)
    assert model.packer.tokens_per_image == model.connector.tokens_per_image > 0
    assert path.read_text().lstrip().startswith("#"), "each config names where its numbers come from"


@pytest.mark.parametrize("name,folder", [("smolvlm-256m.yaml", "SmolVLM-256M-Instruct"), ("smolvlm-500m.yaml", "SmolVLM-500M-Instruct")])
def test_shipped_smolvlm_yaml_equals_spec_from_hf(name, folder):
    from_yaml = vlmkit.load_yaml(REPO / "configs" / name)
    from_hf = vlmkit.spec_from_hf(published_folder(folder))
    for slot in ("vision_tower", "connector", "aligner", "packer", "backbone"):
        assert getattr(from_yaml, slot) == getattr(from_hf, slot), slot


def test_round_trip(tmp_path):
    spec = vlmkit.spec_from_hf(published_folder("SmolVLM-256M-Instruct"))
    text = vlmkit.dump_yaml(spec, tmp_path / "m.yaml")
    again = vlmkit.load_yaml(tmp_path / "m.yaml")
    assert again == spec
    assert yaml.safe_load(text)["connector"] == {"name": "idefics3", "scale_factor": 4}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _valid() -> dict:
    return yaml.safe_load((REPO / "configs" / "smolvlm-256m.yaml").read_text())


@pytest.mark.parametrize(
    "edit,key_path,needle",
    [
        (lambda d: d["backbone"].update(hidden_sizee=5), "backbone.hidden_sizee", "unknown key"),
        (lambda d: d.update(extra_top=1), "extra_top", "unknown key"),
        (lambda d: d["connector"].update(scale_factor="four"), "connector.scale_factor", "integer"),
        (lambda d: d["vision_tower"].update(hidden_act="swishy"), "vision_tower.hidden_act", "swishy"),
        (lambda d: d.pop("backbone"), "backbone", "required"),
        (lambda d: d.update(freeze=["tower"]), None, "unknown slot 'tower'"),
    ],
)
def test_bad_yaml_is_a_spec_error(tmp_path, edit, key_path, needle):
    data = _valid()
    edit(data)
    with pytest.raises(SpecError) as info:
        vlmkit.load_yaml(_write(tmp_path, data))
    assert needle in str(info.value)
    if key_path:
        assert info.value.key_path == key_path
    assert "bad.yaml" in str(info.value)


def test_unknown_component_in_yaml(tmp_path):
    data = _valid()
    data["vision_tower"]["name"] = "sigllip"
    with pytest.raises(UnknownComponentError, match="Did you mean 'siglip'"):
        vlmkit.load_yaml(_write(tmp_path, data))


def test_not_yaml(tmp_path):
    with pytest.raises(SpecError, match="not valid YAML"):
        vlmkit.load_yaml(_write(tmp_path, "vision_tower: [unclosed"))
    with pytest.raises(SpecError, match="mapping"):
        vlmkit.load_yaml(_write(tmp_path, "- a\n- b\n"))


def test_tokens_per_image_contradiction(tmp_path):
    data = _valid()
    data["packer"]["tokens_per_image"] = 81
    with pytest.raises(SpecError, match="connector makes 64"):
        vlmkit.build(vlmkit.load_yaml(_write(tmp_path, data)), load_weights=False)


def test_json_schema_covers_registered_components():
    schema = vlmkit.json_schema()
    towers = {c["properties"]["name"]["const"] for c in schema["properties"]["vision_tower"]["oneOf"]}
    assert {"navit", "siglip"} <= towers
    assert schema["additionalProperties"] is False
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(_valid(), schema)
    bad = _valid()
    bad["backbone"]["nope"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
