"""vlmkit.quantize: int8 linear layers, SmoothQuant folding, quantize_int8 on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vlmkit
from vlmkit.errors import VlmkitError
from vlmkit.quantize import Int8Linear, _smooth_llama, cpu_has_vnni, int8_available, quantize_int8

pytestmark = pytest.mark.skipif(not int8_available(), reason="torch has no quantized CPU kernels")

VOCAB, IMAGE, K = 96, 90, 4


def _spec(tied: bool = False) -> dict:
    return {
        "vision_tower": {"name": "navit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "connector": {"name": "idefics3", "scale_factor": 2},
        "packer": {"name": "image_packer", "image_token_id": IMAGE},
        "backbone": {"name": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "tie_word_embeddings": tied, "eos_token_id": 2, "pad_token_id": 0},
    }  # fmt: skip


def _model(tied: bool = False):
    torch.manual_seed(0)
    return vlmkit.build(_spec(tied), load_weights=False)


def _prompt():
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(3, 80, (1, 5), generator=g), torch.full((1, K), IMAGE), torch.randint(3, 80, (1, 3), generator=g)], 1)
    return ids, torch.randn(1, 1, 3, 32, 32, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


#: 7-bit activations are valid on every CPU (the default without VNNI); 8-bit only where the CPU
#: has VNNI: without it the one-row kernel's 16-bit pair sums can saturate (why torch picks 7 bits).
RANGES = [True, False] if cpu_has_vnni() else [True]


@pytest.mark.parametrize("reduce_range", RANGES, ids=lambda r: "7-bit" if r else "8-bit")
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_close_to_float(bias, reduce_range):
    """The one-row kernel and the many-row path agree in every activation range this CPU uses."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias)
    q = Int8Linear.from_linear(lin)
    q.reduce_range = reduce_range
    x = torch.randn(3, 7, 96)
    with torch.no_grad():
        want = lin(x)
        many = q(x)  # per-row path (torch._int_mm)
        one = torch.stack([q(x[i, j][None, None])[0, 0] for i in range(3) for j in range(7)]).view(3, 7, 40)
    assert many.shape == want.shape == one.shape
    assert _rel(many, want) < (0.05 if reduce_range else 0.03)
    # the one-row kernel and the per-row path quantize each row the same way
    assert torch.allclose(one, many, atol=1e-4, rtol=1e-4)


def test_int8_linear_row_outlier_does_not_spoil_other_rows():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    x[0] *= 1000.0  # a massive first token
    with torch.no_grad():
        got = Int8Linear.from_linear(lin)(x)
        want = lin(x)
    assert _rel(got[1:], want[1:]) < 0.03


def test_smoothing_keeps_the_float_model_exact():
    model = _model()
    smoothed = copy.deepcopy(model)
    ids = _prompt()[0][:, :5]  # text only
    with torch.no_grad():
        _smooth_llama(smoothed.backbone, None)
        assert torch.allclose(smoothed(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_quantize_int8_swaps_linears_and_stays_close(tied):
    model = _model(tied)
    ids, pixels = _prompt()
    with torch.no_grad():
        want = model(ids, pixel_values=pixels).logits
    q = quantize_int8(copy.deepcopy(model), quantize_head=True)
    assert q.quantized == "int8"
    for slot in ("backbone", "vision_tower"):
        assert not [n for n, m in getattr(q, slot).named_modules() if type(m) is nn.Linear], slot
    assert isinstance(q.backbone.lm_head, Int8Linear)
    assert isinstance(q.connector.proj, nn.Linear)  # not a default slot
    with torch.no_grad():
        got = q(ids, pixel_values=pixels).logits
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert _rel(got, want) < 0.1
    out = q.generate(ids, pixel_values=pixels, max_new_tokens=4, eos_token_id=[])
    assert out.shape == (1, ids.shape[1] + 4)
    # the original model is untouched (quantizing a deepcopy never writes into shared weights)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=pixels).logits, want)


@pytest.mark.parametrize("tied", [False, True])
def test_quantize_int8_keeps_the_head_float_by_default(tied):
    model = _model(tied)
    ids = _prompt()[0][:, :5]
    q = quantize_int8(copy.deepcopy(model))
    head = q.backbone.lm_head
    assert head is None if tied else type(head) is nn.Linear
    linears = [n for n, m in q.backbone.named_modules() if type(m) is nn.Linear]
    assert linears == ([] if tied else ["lm_head"])
    # the head is not smoothed either: the final norm and the head weights are the float model's
    assert torch.equal(q.backbone.norm.weight, model.backbone.norm.weight)
    if not tied:
        assert torch.equal(head.weight, model.backbone.lm_head.weight)
    with torch.no_grad():
        assert _rel(q(ids).logits, model(ids).logits) < 0.1


def test_quantize_int8_without_smoothing_and_other_slots():
    q = quantize_int8(_model(), slots=("connector",), smooth=False)
    assert isinstance(q.connector.proj, Int8Linear)
    assert isinstance(q.backbone.lm_head, nn.Linear)


def test_quantize_int8_refuses_bad_input():
    with pytest.raises(VlmkitError, match="no slot"):
        quantize_int8(_model(), slots=("nope",))
    q = quantize_int8(_model())
    with pytest.raises(VlmkitError, match="already quantized"):
        quantize_int8(q)
    with pytest.raises(VlmkitError, match="float32 CPU"):
        quantize_int8(_model().to(torch.bfloat16))
    with pytest.raises(VlmkitError, match="calibration"):
        quantize_int8(_model(), calibration=torch.randn(2, 3))
