"""vlmkit.scheme_choice: ``auto`` and ``int8`` (``--int8``) choose by the CPU's flags and by
timings (injected here through the public ``timings=`` / ``flags=`` parameters, so the choice
logic is tested the same on every CPU), and the real timing runs on the model's weights."""

from __future__ import annotations

import pytest
import torch

from vlmkit import native

from vlmkit.errors import VlmkitError
from vlmkit.quant_schemes import quantize
from vlmkit.quantize import Int8Linear, int8_available
from vlmkit.scheme_choice import PROMPT_ROWS, choose_int8, choose_scheme, has_int8_dot, pick_scheme, time_schemes
from vlmkit.weight_only import WeightOnlyLinear

from .test_quantize import _model

pytestmark = pytest.mark.skipif(not int8_available(), reason="torch has no quantized CPU kernels")

AVX2 = {"capability": "AVX2", "flags": ["avx2", "fma"]}
VNNI = {"capability": "AVX512", "flags": ["avx2", "avx512f", "avx512_vnni"]}
AMX = {"capability": "AVX512", "flags": ["avx2", "avx512f", "amx_int8"]}


def _timings(one: dict, multi: dict) -> dict:
    return {"one_row": {"fp32": 10.0, **one}, "multi_row": {"fp32": 20.0, **multi}}


@pytest.mark.parametrize("one, multi, want", [
    ({"w8": 9.5, "w4": 12.0}, {}, "fp32"),                             # 5% faster one-row: not enough
    ({"w8": 8.0, "w4": 6.0}, {}, "w4"),                                # both qualify: the fastest one-row
    ({"w8": 8.0, "w8a8": 5.0}, {"w8a8": 20.9}, "w8a8"),               # multi-row within 5%
    ({"w8": 8.0, "w8a8": 5.0}, {"w8a8": 24.0}, "w8"),                 # w8a8 prompts 1.2x slower
    ({"w8": 12.0, "w8a8": 5.0}, {"w8a8": 30.0}, "fp32"),              # no scheme qualifies
    ({"w8a8": 5.0}, {}, "fp32"),                                       # w8a8 not timed multi-row
])  # fmt: skip
def test_pick_scheme_needs_10_percent_one_row_and_no_slower_prompts(one, multi, want):
    picked = pick_scheme(_timings(one, multi))
    assert picked["scheme"] == want
    for scheme in one:
        assert scheme in picked["why"]


def test_auto_considers_w8a8_only_with_int8_dot_products():
    timings = _timings({"w8": 8.0, "w8a8": 4.0}, {"w8a8": 15.0})
    backbone = _model().backbone
    assert choose_scheme(backbone, flags=AMX, timings=timings)["scheme"] == "w8a8"
    no_dot = choose_scheme(backbone, flags=AVX2, timings=timings)
    assert no_dot["scheme"] == "w8" and "w8a8" not in no_dot["why"]
    assert no_dot["ms"]["one_row"] == {"fp32": 10.0, "w8": 8.0} and no_dot["timed"] == "given timings"


@pytest.mark.parametrize("flags, one, multi, want, why", [
    (AVX2, {"w8": 8.0}, {}, "w8", "no VNNI/AMX"),
    (AVX2, {"w8": 30.0}, {}, "w8", "w8 decodes slower than float32"),
    (VNNI, {"w8": 8.0, "w8a8": 5.0}, {"w8a8": 19.0}, "w8a8", "avx512_vnni"),
    (AMX, {"w8": 8.0, "w8a8": 5.0}, {"w8a8": 21.0}, "w8a8", "amx_int8"),      # within 5%: not slower
    (AMX, {"w8": 8.0, "w8a8": 5.0}, {"w8a8": 26.0}, "w8", "prompts would be slower"),
    (VNNI, {"w8": 4.0, "w8a8": 5.0}, {"w8a8": 19.0}, "w8", "w8 decodes faster than w8a8"),
])  # fmt: skip
def test_int8_is_w8a8_only_where_int8_dot_products_make_prompts_not_slower(flags, one, multi, want, why):
    choice = choose_int8(_model().backbone, flags=flags, timings=_timings(one, multi))
    assert choice["scheme"] == want and why in choice["why"], choice["why"]
    assert has_int8_dot(flags) == (flags is not AVX2)


def test_int8_without_int8_dot_products_never_times_w8a8():
    with native.disabled():  # without the native step, int8 times the layers
        choice = choose_int8(_model().backbone, flags=AVX2, rounds=2)
    assert choice["scheme"] == "w8" and set(choice["ms"]["one_row"]) == {"fp32", "w8"} and choice["ms"]["multi_row"] == {}


@pytest.mark.skipif(not native.available(), reason=f"vlmkit's native kernels: {native.status()}")
@pytest.mark.parametrize("flags", [AVX2, VNNI, AMX], ids=["avx2", "vnni", "amx"])
def test_int8_is_w8_where_the_backbone_decodes_it_natively(flags):
    backbone = _model().backbone
    assert backbone.native_decode("w8") and not backbone.native_decode("w8a8")
    choice = choose_int8(backbone, flags=flags)
    assert choice["scheme"] == "w8" and "one native call per token" in choice["why"] and choice["ms"] == {}


def test_timing_runs_one_and_many_rows_on_the_weight_group():
    torch.manual_seed(0)
    weights = [torch.randn(96, 64) for _ in range(3)]
    timed = time_schemes(weights, ("w8", "w4", "w8a8"), rounds=2)
    assert set(timed["one_row"]) == {"fp32", "w8", "w4", "w8a8"} and set(timed["multi_row"]) == {"fp32", "w8a8"}
    assert all(ms > 0 for kind in ("one_row", "multi_row") for ms in timed[kind].values())
    assert timed["rows"] == PROMPT_ROWS and "3 of 3 (96x64)" in timed["timed"]
    with native.disabled():
        real = choose_int8(_model().backbone, flags=VNNI, rounds=2)  # this CPU's kernels, whatever it has
    assert real["scheme"] in ("w8a8", "w8") and set(real["ms"]["multi_row"]) == {"fp32", "w8a8"}


@pytest.mark.parametrize("flags, timings, layer", [
    (AVX2, None, WeightOnlyLinear),
    (AMX, _timings({"w8": 8.0, "w8a8": 5.0}, {"w8a8": 18.0}), Int8Linear),
    (AMX, _timings({"w8": 8.0, "w8a8": 5.0}, {"w8a8": 40.0}), WeightOnlyLinear),
])  # fmt: skip
def test_quantize_int8_applies_the_chosen_scheme(flags, timings, layer):
    model = _model().eval()
    report = quantize(model, "int8", flags=flags, timings=timings)
    assert report["requested"] == "int8" and report["scheme"] == report["choice"]["scheme"]
    assert isinstance(model.backbone.layers[0].mlp.down_proj, layer)
    assert model.quantized == ("int8" if layer is Int8Linear else "w8")


def test_bad_timings_and_ignored_options_are_vlmkit_errors():
    backbone = _model().backbone
    with pytest.raises(VlmkitError, match="(?s)multi_row.*w8a8"):
        choose_int8(backbone, flags=AMX, timings={"one_row": {"fp32": 1.0, "w8": 1.0, "w8a8": 1.0}})
    with pytest.raises(VlmkitError, match="one_row.*fp32"):
        pick_scheme({"one_row": {"w8": 1.0}})
    with pytest.raises(VlmkitError, match="only apply to the schemes chosen per CPU"):
        quantize(_model(), "w8", timings=_timings({}, {}))
    with pytest.raises(VlmkitError, match="flags must be a dict"):
        quantize(_model(), "int8", flags=["avx2"])
