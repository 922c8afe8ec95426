"""vlmkit.limits: the bound table, its environment overrides, the memory estimate and the sandbox."""

from __future__ import annotations

import resource

import pytest

from vlmkit import limits
from vlmkit.errors import ProcessorError, SpecError, VlmkitError
from vlmkit.limits import LIMITS, available_memory, limit, loads_json

from ..conftest import BUNDLED


def test_every_bound_has_a_positive_default_and_a_variable():
    for lim in LIMITS.values():
        assert lim.default > 0 and lim.env == f"VLMKIT_MAX_{lim.name.upper()}"


def test_environment_overrides_and_bad_values(monkeypatch):
    monkeypatch.setenv("VLMKIT_MAX_JSON_DEPTH", "3")
    assert limit("json_depth") == 3
    with pytest.raises(SpecError, match="VLMKIT_MAX_JSON_DEPTH"):
        loads_json('{"a": {"b": {"c": 1}}}', source="x.json")
    assert loads_json('{"a": {"b": 1}}', source="x.json") == {"a": {"b": 1}}
    for bad in ("0", "-1", "nan", "many"):
        monkeypatch.setenv("VLMKIT_MAX_JSON_DEPTH", bad)
        with pytest.raises(VlmkitError, match="VLMKIT_MAX_JSON_DEPTH"):
            limit("json_depth")


def test_available_memory_takes_the_least_of_its_sources(monkeypatch):
    monkeypatch.setattr(limits, "_mem_available", lambda: (8 << 30, "available memory (MemAvailable)"))
    monkeypatch.setattr(limits, "_cgroup_room", lambda: (2 << 30, "room under the cgroup memory limit (memory.max)"))
    monkeypatch.setattr(limits, "_rlimit_room", lambda: None)
    assert available_memory() == (2 << 30, "room under the cgroup memory limit (memory.max)")
    monkeypatch.setattr(limits, "_cgroup_room", lambda: None)
    assert available_memory()[0] == 8 << 30


def test_rlimit_room_follows_ulimit_v():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        pytest.skip("this process already runs under ulimit -v")
    assert limits._rlimit_room() is None  # noqa: SLF001 - the helper under test


#: The published folders that ship a chat template (SmolVLM2-256M's files have none).
WITH_TEMPLATE = sorted(p.parent.name for p in BUNDLED.glob("*/chat_template.json"))


@pytest.mark.parametrize("name", WITH_TEMPLATE)
def test_published_templates_render_as_plain_jinja(name):
    """The bounded sandbox changes nothing for a real template (transformers' environment)."""
    import json

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from vlmkit.processor.text import ChatTemplate

    assert len(WITH_TEMPLATE) >= 3
    path = BUNDLED / name / "chat_template.json"
    text = json.loads(path.read_text())["chat_template"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]  # fmt: skip
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(text)
    assert ChatTemplate(text, origin=str(path)).render(messages, add_generation_prompt=True) == plain.render(
        messages=messages, add_generation_prompt=True
    )


def test_template_bounds_restore_after_a_refusal():
    from vlmkit.processor.text import ChatTemplate

    with pytest.raises(ProcessorError, match="VLMKIT_MAX_TEMPLATE_OUTPUT"):
        ChatTemplate("{{ 'a' * 10**9 }}", origin="t.jinja").render([])
    assert ChatTemplate("{{ 'a' * 3 }}", origin="t.jinja").render([]) == "aaa"
