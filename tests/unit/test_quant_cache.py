"""vlmkit.quant_cache with ``w8a8`` (vlmkit.int8_store): the second run loads the int8 weights,
scales, biases and SmoothQuant's norm weights from the cache (bit-identical logits and tokens to
the first run, on any CPU: both runs use this CPU's kernels); a corrupt or mismatched file is
ignored with one warning line and rewritten (for ``w8`` too); nothing is unpickled."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit.quant_cache import cache_dir, cache_key
from vlmkit.quant_schemes import cache_name, quantize
from vlmkit.quantize import Int8Linear, int8_available

from .test_quant_schemes import _save_source
from .test_quantize import _model, _prompt

pytestmark = pytest.mark.skipif(not int8_available(), reason="torch has no quantized CPU kernels")


def _run(source, cache, scheme="w8a8", **kw):
    """A fresh model quantized with ``scheme``: (report, prompt logits, 4 greedy tokens)."""
    model = _model().eval()
    report = quantize(model, scheme, source=source, cache=cache, **kw)
    ids, pixels = _prompt()
    with torch.no_grad():
        logits = model(ids, pixel_values=pixels).logits
    tokens = model.generate(ids, pixel_values=pixels, max_new_tokens=4)  # one-row steps: the packed kernel
    return report, logits, tokens, model


def _file(tmp_path, scheme):
    return cache_dir(tmp_path / "cache") / f"{cache_key(tmp_path / 'src', cache_name(scheme))}-{scheme}.safetensors"


def test_w8a8_second_run_loads_the_cache_bit_identical(tmp_path):
    source = _save_source(_model(), tmp_path / "src")
    r1, logits1, tokens1, first = _run(source, tmp_path / "cache")
    r2, logits2, tokens2, second = _run(source, tmp_path / "cache")
    assert (r1["cache"], r2["cache"]) == ("written", "hit") and r1["layers"] == r2["layers"] > 0
    assert torch.equal(logits1, logits2) and torch.equal(tokens1, tokens2)
    stored = load_file(str(_file(tmp_path, "w8a8")))
    smoothed = {k for k in stored if k.endswith("::smoothed")}
    assert smoothed == {f"backbone.layers.{i}.{n}.weight::smoothed" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    a, b = second.backbone.layers[1].input_layernorm.weight, first.backbone.layers[1].input_layernorm.weight
    assert torch.equal(a, b) and not torch.equal(a, _model().backbone.layers[1].input_layernorm.weight)
    assert sum(isinstance(m, Int8Linear) for m in second.vision_tower.modules()) > 0
    assert sum(isinstance(m, Int8Linear) for m in second.modules()) == r2["layers"]
    assert not isinstance(second.backbone.lm_head, Int8Linear)  # the head stays float32, as quantize_int8's default
    # --int8 resolving to w8a8 shares the file of --quantize w8a8
    r3 = _run(source, tmp_path / "cache", "int8", flags={"capability": "x", "flags": ["amx_int8"]},
              timings={"one_row": {"fp32": 10.0, "w8": 9.0, "w8a8": 5.0}, "multi_row": {"fp32": 10.0, "w8a8": 9.0}})[0]  # fmt: skip
    assert (r3["scheme"], r3["cache"]) == ("w8a8", "hit")


@pytest.mark.parametrize("scheme", ["w8a8", "w8"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "mismatched", "other scheme"])
def test_a_bad_cache_file_is_ignored_with_one_warning_and_rewritten(tmp_path, caplog, scheme, damage):
    source = _save_source(_model(), tmp_path / "src")
    _, want, _, _ = _run(source, tmp_path / "cache", scheme)
    path = _file(tmp_path, scheme)
    if damage == "garbage":
        path.write_bytes(b"\x80\x04not a safetensors file (and never unpickled)")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        tensors = load_file(str(path))
        key = next(k for k in sorted(tensors) if k.endswith(("::qweight", "::q8")))
        tensors[key] = tensors[key][:-1].contiguous()  # one row short
        save_file(tensors, str(path), metadata={"scheme": "w4" if damage == "other scheme" else scheme})
    with caplog.at_level(logging.WARNING, logger="vlmkit"):
        report, got, _, _ = _run(source, tmp_path / "cache", scheme)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "\n" not in warnings[0], warnings
    assert report["cache"] == "written" and torch.equal(got, want)
    assert _run(source, tmp_path / "cache", scheme)[0]["cache"] == "hit"  # rewritten whole


@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_a_cache_file_in_another_layout_is_not_used(tmp_path, caplog, scheme):
    """An older layout's scales (w8: one per row; w4: float32) under this layout's key: refused, rewritten."""
    source = _save_source(_model(), tmp_path / "src")
    _, want, _, _ = _run(source, tmp_path / "cache", scheme)
    path = _file(tmp_path, scheme)
    old = (lambda v: v.amax(1).contiguous()) if scheme == "w8" else (lambda v: v.float())
    tensors = {k: (old(v) if k.endswith("::scale") else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"scheme": scheme})
    with caplog.at_level(logging.WARNING, logger="vlmkit"):
        report, got, _, model = _run(source, tmp_path / "cache", scheme)
    assert report["cache"] == "written" and torch.equal(got, want)
    assert any("does not fit" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    layer = model.backbone.layers[0].mlp.gate_up_proj
    assert layer.quantized["scale"].dtype == (torch.float32 if scheme == "w8" else torch.float16)


def test_the_int8_and_auto_choice_is_cached_per_source_and_cpu(tmp_path, caplog, monkeypatch):
    """A second run reads the earlier run's choice (no timing); a choice timed on a CPU with other
    flags, or a damaged file, is ignored with one warning and the schemes are timed again."""
    import json

    import vlmkit.quant_schemes as qs

    source = _save_source(_model(), tmp_path / "src")
    cache = tmp_path / "cache"
    calls = []
    real = dict(qs.CHOSEN)
    monkeypatch.setattr(qs, "CHOSEN", {k: (lambda b, f=fn, k=k, **kw: calls.append(k) or f(b, **kw)) for k, fn in real.items()})
    for scheme in ("int8", "auto"):
        first = _run(source, cache, scheme)[0]
        second = _run(source, cache, scheme)[0]
        assert "cached" not in first["choice"] and second["choice"]["cached"] is True
        assert second["scheme"] == first["scheme"] and second["choice"]["why"] == first["choice"]["why"]
    assert calls == ["int8", "auto"]  # each timed once
    path = cache_dir(cache) / f"{cache_key(source, f'choice-int8-rules{qs.CHOICE_RULES}')}-choice.json"
    stored = json.loads(path.read_text())
    for damage in ({**stored, "cpu": {"capability": "other", "flags": []}}, "not json {"):
        path.write_text(damage if isinstance(damage, str) else json.dumps(damage))
        with caplog.at_level(logging.WARNING, logger="vlmkit"):
            caplog.clear()
            again = _run(source, cache, "int8")[0]
        assert "cached" not in again["choice"] and len([r for r in caplog.records if "choice.json" in r.getMessage()]) == 1
    assert calls == ["int8", "auto", "int8", "int8"]
    given = _run(source, cache, "int8", flags={"capability": "x", "flags": []})[0]  # given flags: never cached
    assert "cached" not in given["choice"] and given["scheme"] == "w8"
