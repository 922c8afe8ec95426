"""The family boundary: the core names no model family; families register like components."""

from __future__ import annotations

import re

import pytest

import vlmkit
from vlmkit import plugins
from vlmkit.errors import PluginError, SpecError
from vlmkit.family import Family, bundled_folder, family_for_config

from ..conftest import REPO, published_folder

FAMILY_NAMES = re.compile(r"idefics|smolvlm|llava", re.IGNORECASE)


def test_core_modules_name_no_family():
    core = [*(REPO / "vlmkit").glob("*.py"), *(REPO / "vlmkit" / "processor").glob("*.py"),
            *(REPO / "vlmkit" / "generation").glob("*.py")]  # fmt: skip
    offenders = [str(p.relative_to(REPO)) for p in core if FAMILY_NAMES.search(p.read_text(encoding="utf-8"))]
    assert len(core) > 20 and offenders == []


def test_the_builtin_family_answers_its_model_types():
    registry = vlmkit.get_registry()
    family = family_for_config({"model_type": "smolvlm"})
    assert family is registry.family("idefics3") and family.name == "idefics3"
    assert family_for_config({"model_type": "no-such-family"}) is None
    assert {"idefics3", "smolvlm"} <= set(registry.model_types())


def test_bundled_folders_come_from_the_family():
    for name in ("SmolVLM-256M-Instruct", "SmolVLM2-500M-Video-Instruct"):
        assert bundled_folder(f"HuggingFaceTB/{name}") == published_folder(name)
    assert bundled_folder("someone/else") is None


def test_key_paths_translate_through_the_family_sections():
    family = family_for_config({"model_type": "idefics3"})
    assert family.config_key_path("backbone.hidden_size") == "text_config.hidden_size"
    assert family.config_key_path("vision_tower") == "vision_config"
    assert family.config_key_path("connector.scale_factor") == "scale_factor"
    assert family.config_key_path("weights") == "weights"


class _Twin(Family):
    name = "twin"
    model_types = ("idefics3",)  # already the built-in family's


class _TwinPlugin:
    @vlmkit.hookimpl
    def vlmkit_register_components(self, registry):
        registry.add_family(_Twin())


class _NotAFamilyPlugin:
    @vlmkit.hookimpl
    def vlmkit_register_components(self, registry):
        registry.add_family(object())


def test_a_model_type_claimed_twice_is_refused_and_nothing_stays_registered():
    with pytest.raises(PluginError, match="model_type 'idefics3' is claimed by two families"):
        vlmkit.register_plugin(_TwinPlugin(), name="twin-family")
    assert vlmkit.get_registry().family("idefics3").name == "idefics3"
    with pytest.raises(PluginError, match="expected a vlmkit.family.Family"):
        vlmkit.register_plugin(_NotAFamilyPlugin(), name="not-a-family")


def test_unknown_model_type_lists_what_is_installed(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mystery"}')
    with pytest.raises(SpecError) as err:
        vlmkit.spec_from_hf(tmp_path)
    assert "mystery" in err.value.detail and "idefics3" in (err.value.hint or "")


def test_stop_ids_are_one_answer_for_processor_and_generation():
    from vlmkit.generation import default_stop_ids

    folder = published_folder("SmolVLM-256M-Instruct")
    spec = vlmkit.spec_from_hf(folder)
    model = vlmkit.build(spec.model_copy(update={"weights": None}), load_weights=False)
    assert default_stop_ids(model) == vlmkit.load_processor(folder).eos_token_ids == [49279, 2]
    assert plugins.BUILTIN_MODULES == tuple(sorted(plugins.BUILTIN_MODULES))
    assert vlmkit.get_registry().family("llava").name == "llava"


def test_no_module_imports_a_private_name_from_another():
    import ast

    offenders = []
    for path in (REPO / "vlmkit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("vlmkit")):
                offenders += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]  # fmt: skip
    assert offenders == []
