"""vlmkit.quant_schemes / weight_only / quant_cache: weight-only int8/int4 one-row layers agree
with their dequantized weights and with float32, multi-row calls stay float32, quantize(scheme)
for every scheme, the on-disk cache (hit on the second run, same tensors), bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmkit.errors import VlmkitError
from vlmkit.quant_cache import cache_key
from vlmkit.quant_schemes import SCHEMES, choose_scheme, cpu_flags, has_int8_dot, quantize
from vlmkit.weight_only import HEAD_SCHEME, WeightOnlyLinear, dequantize, quantize_w4, quantize_w8, unpack_w4

from .test_quantize import _model, _prompt


def _dequant_w8(w):
    """The int8 values quantize_w8 rounds ``w`` to, recomputed independently: a float32 scale
    per 32 inputs (per row where 32 does not divide the inputs)."""
    out, inp = w.shape
    g = w.reshape(out, -1, 32 if inp % 32 == 0 else inp)
    scale = g.abs().amax(-1, keepdim=True) / 127.0
    return (torch.round(g / scale).clamp(-127, 127) * scale).reshape(out, inp)


def _dequant_w4(w, group):
    """The int4 values quantize_w4 rounds ``w`` to, recomputed independently (float16 scale and minimum)."""
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    lo = g.amin(-1, keepdim=True).half().float()
    scale = ((g.amax(-1, keepdim=True) - lo) / 15.0).half().float()
    q = torch.round((g - lo) / scale).clamp(0, 15)
    return (q * scale + lo).reshape(out, inp)


@pytest.mark.parametrize("scheme", ["w8", "w4"])
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_kernel_equals_its_dequantized_weight(scheme, bias):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g))
    layer = WeightOnlyLinear.from_linear(lin, scheme)
    x = torch.randn(1, 1, 64, generator=g)
    deq = _dequant_w8(lin.weight.detach()) if scheme == "w8" else _dequant_w4(lin.weight.detach(), layer.group)
    assert torch.equal(dequantize(layer.quantized), deq)
    want = nn.functional.linear(x, deq, lin.bias)
    with torch.no_grad():
        got = layer(x)
        exact = lin(x)
    assert got.shape == (1, 1, 48)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert 0 < (got - exact).abs().max() < (0.02 if scheme == "w8" else 0.2) * exact.abs().max()
    rows = torch.randn(3, 64, generator=g)
    with torch.no_grad():
        assert torch.allclose(layer(rows), lin(rows), atol=1e-5)  # several rows: float32, exact


def test_w4_packing_keeps_the_group_layout():
    w = torch.randn(32, 128)
    packed = quantize_w4(w, 64)
    assert packed["q4"].shape == (32, 64) and packed["scale"].shape == packed["lo"].shape == (32, 2)
    q = unpack_w4(packed)
    assert q.shape == (32, 128) and int(q.min()) >= 0 and int(q.max()) <= 15
    assert packed["scale"].dtype == packed["lo"].dtype == torch.float16
    deq = (q.float().reshape(32, 2, 64) * packed["scale"].float()[..., None] + packed["lo"].float()[..., None]).reshape(32, 128)
    assert torch.allclose(deq, _dequant_w4(w, 64), atol=1e-6) and torch.equal(dequantize(packed), deq)


@pytest.mark.parametrize(("inp", "groups"), [(64, 2), (576, 18), (40, 1), (33, 1)])
def test_w8_scales_are_per_32_inputs_or_per_row(inp, groups):
    w = torch.randn(6, inp)
    q = quantize_w8(w)
    assert q["q8"].dtype == torch.int8 and q["scale"].dtype == torch.float32 and q["scale"].shape == (6, groups)
    assert int(q["q8"].abs().max()) == 127  # each group's largest weight maps to +-127
    assert torch.equal(dequantize(q), _dequant_w8(w))
    assert (dequantize(q) - w).abs().max() <= w.abs().max() / 127


def test_group_scales_beat_one_scale_per_row_on_an_outlier():
    """One large weight in a row costs a per-row scale the whole row's precision; per 32 inputs only its group's."""
    w = torch.randn(4, 128) * 0.01
    w[:, 3] = 5.0
    err = (dequantize(quantize_w8(w)) - w)[:, 32:].abs().max()
    per_row = (torch.round(w / (w.abs().amax(1, keepdim=True) / 127)) * (w.abs().amax(1, keepdim=True) / 127) - w)[:, 32:].abs().max()
    assert err < per_row / 50


def test_weights_beyond_w4s_float16_scales_are_a_clear_error():
    model = _model().eval()
    with torch.no_grad():
        model.backbone.layers[1].mlp.down_proj.weight[0, 0] = 1e10
    with pytest.raises(VlmkitError, match=r"(?s)layers\.1\.mlp\.down_proj.*1e\+10.*float16.*w8"):
        quantize(model, "w4")
    assert quantize(model, "w8")["layers"] > 0  # float32 scales hold it


@pytest.mark.parametrize("scheme", ["w8", "w4"])
@pytest.mark.parametrize("tied", [False, True])
def test_quantize_weight_only_agrees_with_float(scheme, tied):
    ref, model = _model(tied).eval(), _model(tied).eval()
    ids, pixels = _prompt()
    report = quantize(model, scheme)
    assert report["scheme"] == scheme and report["layers"] == 2 * 4 + 1 and report["kept_float"] == {}
    assert model.quantized == scheme
    assert isinstance(model.backbone.lm_head, WeightOnlyLinear)
    assert model.backbone.lm_head.scheme == HEAD_SCHEME.get(scheme, scheme) == "w8"  # int4 layers keep an int8 head
    assert not any(isinstance(m, WeightOnlyLinear) for m in model.vision_tower.modules())
    with torch.no_grad():
        full_ref, full = ref(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits
    assert torch.allclose(full, full_ref, atol=1e-5)  # the prompt (several rows) stays float32
    a = ref.generate(ids, pixel_values=pixels, max_new_tokens=6)
    b = model.generate(ids, pixel_values=pixels, max_new_tokens=6)
    assert a.shape == b.shape
    with pytest.raises(VlmkitError, match="already quantized"):
        quantize(model, "w8")


def test_fp32_scheme_and_auto_choose_by_timing():
    model = _model().eval()
    assert quantize(model, "fp32")["layers"] == 0 and model.backbone.decode_layout
    report = choose_scheme(_model().backbone, rounds=2)
    assert report["scheme"] in ("fp32", "w8", "w4", "w8a8") and set(report["ms"]["one_row"]) >= {"fp32", "w8"}
    assert ("w8a8" in report["ms"]["multi_row"]) == has_int8_dot() and report["why"] and report["timed"]
    assert report["cpu"]["capability"] and isinstance(cpu_flags()["flags"], list)
    auto = quantize(_model().eval(), "auto")
    assert auto["requested"] == "auto" and auto["scheme"] == auto["choice"]["scheme"]


def test_w8a8_is_the_dynamic_int8_path():
    from vlmkit.quantize import Int8Linear

    model = _model().eval()
    report = quantize(model, "w8a8")
    assert report["layers"] > 0 and any(isinstance(m, Int8Linear) for m in model.vision_tower.modules())


def _save_source(model, folder):
    from vlmkit.weights import save_safetensors

    folder.mkdir()
    save_safetensors({k: v for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def test_cache_hit_gives_the_same_layers(tmp_path):
    source = _save_source(_model(), tmp_path / "src")
    first, second = _model().eval(), _model().eval()
    r1 = quantize(first, "w8", source=source, cache=tmp_path / "cache")
    r2 = quantize(second, "w8", source=source, cache=tmp_path / "cache")
    assert (r1["cache"], r2["cache"]) == ("written", "hit")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    a, b = first.backbone.layers[0].mlp.gate_up_proj, second.backbone.layers[0].mlp.gate_up_proj
    assert torch.equal(a.quantized["q8"], b.quantized["q8"]) and torch.equal(a.quantized["scale"], b.quantized["scale"])
    assert cache_key(source, "w8") != cache_key(source, "w4")


def test_bad_scheme_and_source_are_vlmkit_errors(tmp_path):
    with pytest.raises(VlmkitError, match="(?s)'int3'.*" + ", ".join(SCHEMES)):
        quantize(_model(), "int3")
    with pytest.raises(VlmkitError, match="no safetensors weights"):
        quantize(_model(), "w8", source=tmp_path)
