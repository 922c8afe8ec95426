"""vlmkit.decode_layout: GemvLinear / linear_rows equal F.linear, prepare_decode's choices, memory
not doubled, once-per-backbone preparation by the decode loop, bad layout names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlmkit
from vlmkit.decode_layout import GemvLinear, ensure_decode_layout, faster_transposed, is_transposed, linear_rows, prepare_decode
from vlmkit.errors import VlmkitError

from .test_quantize import _model, _prompt


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_rows_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    x = torch.randn(1, rows, 24, generator=g)
    col = w.t().contiguous().t()
    assert is_transposed(col) and not is_transposed(w)
    want = F.linear(x, w, b)
    for weight in (w, col):
        got = linear_rows(x, weight, b)
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-5


def test_gemv_linear_shares_parameters_and_keeps_gradients():
    lin = nn.Linear(8, 5)
    gemv = GemvLinear.from_linear(lin)
    assert gemv.weight is lin.weight and gemv.bias is lin.bias and isinstance(gemv, nn.Linear)
    gemv.weight = nn.Parameter(lin.weight.detach().t().contiguous().t())
    x = torch.randn(1, 8)
    gemv(x).sum().backward()
    assert gemv.weight.grad is not None and (gemv.weight.grad - x.expand(5, 8)).abs().max() < 1e-6


@pytest.mark.parametrize("tied", [False, True])
def test_prepare_decode_replaces_weights_without_growing_memory(tied):
    model = _model(tied).eval()
    ids, pixels = _prompt()
    with torch.no_grad():
        want = model(ids, pixel_values=pixels).logits
    before = sum(p.numel() for p in model.parameters())
    chosen = prepare_decode(model.backbone, "transposed")
    assert chosen and set(chosen.values()) == {"transposed"}
    assert sum(p.numel() for p in model.parameters()) == before
    assert all(is_transposed(m.weight) for m in model.backbone.modules() if isinstance(m, GemvLinear))
    assert is_transposed(model.backbone.embed_tokens.weight) == tied
    with torch.no_grad():
        got = model(ids, pixel_values=pixels).logits
    assert (got - want).abs().max() < 1e-5
    prepare_decode(model.backbone, "rows")  # and back
    assert not any(is_transposed(m.weight) for m in model.backbone.modules() if isinstance(m, GemvLinear))


def test_auto_layout_times_and_chooses_per_shape(monkeypatch):
    from vlmkit import decode_layout, native

    timed = []
    monkeypatch.setattr(decode_layout, "faster_transposed", lambda weights, rounds: timed.append(weights[0].shape) or True)
    model = _model().eval()
    with native.disabled():  # without vlmkit's kernels: each shape timed, the faster layout kept
        chosen = prepare_decode(model.backbone)  # auto
    shapes = {tuple(m.weight.shape) for m in model.backbone.modules() if isinstance(m, nn.Linear)}
    assert set(chosen) == shapes and set(chosen.values()) == {"transposed"} and {tuple(s) for s in timed} >= shapes
    monkeypatch.undo()
    assert isinstance(faster_transposed([torch.randn(16, 8)], rounds=2), bool)


def test_auto_layout_keeps_rows_untimed_where_the_native_kernels_run(monkeypatch):
    from vlmkit import decode_layout, native

    if not native.available():
        pytest.skip(f"vlmkit's native kernels are not available here: {native.status()}")
    monkeypatch.setattr(decode_layout, "faster_transposed", lambda *a, **k: pytest.fail("auto timed a layout"))
    model = _model().eval()
    chosen = prepare_decode(model.backbone)  # auto
    assert chosen and set(chosen.values()) == {"rows"}
    assert not any(is_transposed(m.weight) for m in model.backbone.modules() if isinstance(m, GemvLinear))


def test_generate_prepares_the_layout_once():
    model = _model().eval()
    ids, pixels = _prompt()
    assert getattr(model.backbone, "decode_layout", None) is None
    first = model.generate(ids, pixel_values=pixels, max_new_tokens=4)
    layout = model.backbone.decode_layout
    assert layout
    weights = {id(m.weight) for m in model.backbone.modules() if isinstance(m, GemvLinear)}
    again = model.generate(ids, pixel_values=pixels, max_new_tokens=4)
    assert model.backbone.decode_layout is layout
    assert weights == {id(m.weight) for m in model.backbone.modules() if isinstance(m, GemvLinear)}
    assert torch.equal(first, again)
    ensure_decode_layout(model.backbone)
    assert model.backbone.decode_layout is layout


def test_bad_layout_is_a_vlmkit_error():
    with pytest.raises(VlmkitError, match="(?s)'diagonal'.*auto, transposed, rows"):
        prepare_decode(_model().backbone, "diagonal")


def test_int8_quantization_after_the_layout_still_quantizes_every_linear():
    from vlmkit.quantize import Int8Linear, quantize_int8

    model = _model().eval()
    ids, pixels = _prompt()
    with torch.no_grad():
        want = model(ids, pixel_values=pixels).logits
    prepare_decode(model.backbone, "transposed")
    quantize_int8(model)
    assert not any(isinstance(m, GemvLinear) for m in model.backbone.layers.modules())
    assert isinstance(model.backbone.layers[0].mlp.down_proj, Int8Linear)
    with torch.no_grad():
        got = model(ids, pixel_values=pixels).logits
    assert ((got - want).norm() / want.norm()) < 0.1


def test_prepare_decode_frees_each_old_weight_before_making_the_next():
    """At most one weight exists twice while the layout is re-stored: every old weight is released
    as soon as its copy replaces it (the peak memory grows by one weight, not by the model)."""
    import gc
    import weakref

    model = _model(False).eval()
    olds = [weakref.ref(m.weight) for m in model.backbone.modules() if isinstance(m, nn.Linear)]
    alive_at_each_copy = []
    real_param = nn.Parameter

    class Counting(real_param):  # counts the old weights still alive each time a new one is made
        def __new__(cls, data=None, requires_grad=True):
            gc.collect()
            alive_at_each_copy.append(sum(r() is not None for r in olds))
            return real_param(data, requires_grad)

    import vlmkit.decode_layout as layout

    layout.nn.Parameter = Counting
    try:
        prepare_decode(model.backbone, "transposed")
    finally:
        layout.nn.Parameter = real_param
    # at the i-th copy only the i weights already replaced are gone (all of them, at once, before)
    assert alive_at_each_copy == [len(olds) - i for i in range(len(olds))]
    gc.collect()
    assert all(r() is None for r in olds)


def test_a_linear_sharing_an_embedding_weight_stays_shared():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(50, 8)
            self.lm_head = nn.Linear(8, 50, bias=False)
            self.lm_head.weight = self.embed_tokens.weight

    torch.manual_seed(0)
    module = Tied()
    ids = torch.tensor([[3, 7, 49]])
    want = module.lm_head(module.embed_tokens(ids))
    prepare_decode(module, "transposed")
    assert module.lm_head.weight is module.embed_tokens.weight and is_transposed(module.embed_tokens.weight)
    assert len(list(module.parameters())) == 1
    with torch.no_grad():
        assert (module.lm_head(module.embed_tokens(ids)) - want).abs().max() < 1e-5  # summation order differs by CPU (MKL paths)
