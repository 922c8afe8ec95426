"""A bfloat16 vision side beside a float32 text model (vlmkit.vision_dtype): the tower gets its
pixels in its dtype, the text model its visual tokens in its own, results stay close to float32,
and what cannot be cast is a vlmkit error."""

from __future__ import annotations

import logging

import pytest
import torch

from vlmkit.errors import VlmkitError
from vlmkit.quantize import quantize_int8
from vlmkit.vision_dtype import has_bf16_units, set_vision_dtype

from .test_quantize import _model, _prompt

BF16_CPU = {"capability": "AVX512", "flags": ["avx512f", "avx512_bf16"]}
AVX2 = {"capability": "AVX2", "flags": ["avx2", "fma"]}


def test_bf16_vision_with_float32_text_stays_close_and_generates():
    ref, model = _model().eval(), _model().eval()
    report = set_vision_dtype(model, "bf16", flags=BF16_CPU)
    assert report == {"dtype": "bfloat16", "slots": ["vision_tower", "connector", "aligner"], "bf16_units": True, "note": ""}
    assert all(p.dtype == torch.bfloat16 for p in model.vision_tower.parameters())
    assert all(p.dtype == torch.float32 for p in model.backbone.parameters())
    ids, pixels = _prompt()
    with torch.no_grad():
        tokens, per_sample = model.encode_images(pixels)
        want, _ = ref.encode_images(pixels)
        assert tokens.dtype == torch.float32 and per_sample == [1]
        assert ((tokens - want).norm() / want.norm()) < 0.05
        logits, ref_logits = model(ids, pixel_values=pixels).logits, ref(ids, pixel_values=pixels).logits
    assert logits.dtype == torch.float32 and ((logits - ref_logits).norm() / ref_logits.norm()) < 0.05
    assert model.generate(ids, pixel_values=pixels, max_new_tokens=4).shape[1] == ids.shape[1] + 4


def test_padding_images_give_no_tokens_in_the_text_dtype():
    model = _model().eval()
    set_vision_dtype(model, torch.bfloat16, flags=BF16_CPU)
    with torch.no_grad():
        tokens, per_sample = model.encode_images(torch.zeros(1, 1, 3, 32, 32))
    assert tokens.shape[0] == 0 and tokens.dtype == torch.float32 and per_sample == [0]


def test_a_cpu_without_bf16_units_gets_a_note(caplog):
    assert has_bf16_units(BF16_CPU) and not has_bf16_units(AVX2)
    with caplog.at_level(logging.WARNING, logger="vlmkit.vision_dtype"):
        report = set_vision_dtype(_model(), "bfloat16", flags=AVX2)
    assert report["bf16_units"] is False and "no bfloat16 units" in report["note"] and "slower" in caplog.text


@pytest.mark.parametrize("dtype, match", [("int4", "unknown dtype 'int4'"), (torch.int16, "not a floating-point"), (3, "dtype must be")])
def test_bad_dtypes_are_vlmkit_errors_that_name_the_choices(dtype, match):
    model = _model()
    with pytest.raises(VlmkitError, match=match) as err:
        set_vision_dtype(model, dtype)
    assert "bfloat16" in str(err.value)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # nothing changed


def test_an_int8_vision_tower_is_refused():
    model = _model().eval()
    quantize_int8(model, slots=("vision_tower",))
    with pytest.raises(VlmkitError, match="int8-quantized"):
        set_vision_dtype(model, "bfloat16")


VNNI = {"capability": "AVX512", "flags": ["avx512f", "avx512_vnni"]}


def test_int8_vision_side_keeps_the_text_model_and_its_scheme():
    """``int8``: the tower's linear layers become w8a8 int8 (as quantize(..., 'w8a8') makes them)
    while the text model stays as it was -- here weight-only w8, which keeps its native decode."""
    from vlmkit.quant_schemes import quantize
    from vlmkit.quantize import Int8Linear
    from vlmkit.weight_only import WeightOnlyLinear

    ref, model = _model().eval(), _model().eval()
    quantize(model, "w8")
    report = set_vision_dtype(model, "int8", flags=VNNI)
    assert report == {"dtype": "int8", "slots": ["vision_tower"], "bf16_units": None, "int8_dot": True, "note": ""}
    assert model.quantized == "w8"  # still says what the text model is
    assert any(isinstance(m, Int8Linear) for m in model.vision_tower.modules())
    assert not any(isinstance(m, Int8Linear) for m in model.backbone.modules())
    assert any(isinstance(m, WeightOnlyLinear) for m in model.backbone.modules())
    ids, pixels = _prompt()
    with torch.no_grad():
        tokens, _ = model.encode_images(pixels)
        want, _ = ref.encode_images(pixels)
    assert tokens.dtype == torch.float32 and 0 < ((tokens - want).norm() / want.norm()) < 0.1
    assert model.generate(ids, pixel_values=pixels, max_new_tokens=4).shape[1] == ids.shape[1] + 4
    again = set_vision_dtype(model, "w8a8")
    assert again["note"] == "the vision tower is int8 (w8a8) already"


def test_int8_vision_on_a_cpu_without_int8_dot_products_gets_a_note(caplog):
    with caplog.at_level(logging.WARNING, logger="vlmkit.vision_dtype"):
        report = set_vision_dtype(_model(), torch.int8, flags=AVX2)
    assert report["int8_dot"] is False and "no int8 dot products" in report["note"] and "slower" in caplog.text


def test_int8_needs_a_float32_tower_and_names_resolve_once():
    from vlmkit.vision_dtype import vision_dtype_name

    model = _model()
    set_vision_dtype(model, "bfloat16", flags=BF16_CPU)
    with pytest.raises(VlmkitError, match="float32 CPU models"):
        set_vision_dtype(model, "int8")
    assert [vision_dtype_name(n) for n in ("w8a8", "int8", torch.int8, "bf16", "fp32")] == ["int8", "int8", "int8", "bfloat16", "float32"]
    with pytest.raises(VlmkitError, match="unknown dtype 'int4'.*'int8' \\(w8a8 vision layers\\)"):
        vision_dtype_name("int4")
