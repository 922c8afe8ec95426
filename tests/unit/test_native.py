"""vlmkit's own one-row kernels (vlmkit.native): equal to torch's products on awkward shapes,
used by the decode paths, switched off on request, and a missing or broken compiler is reported
(the callers keep torch's kernels) instead of failing."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from vlmkit import native
from vlmkit.decode_layout import GemvLinear, linear_rows
from vlmkit.weight_only import WeightOnlyLinear, dequantize, quantize_w4, quantize_w8

needs_kernels = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")

SHAPES = [(1, 1), (3, 5), (4, 16), (7, 33), (64, 576), (1003, 577), (49, 1536)]


@pytest.fixture(autouse=True)
def _fresh_kernels(tmp_path_factory, monkeypatch):
    """Every test compiles into (or loads from) one session-wide temporary cache."""
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path_factory.getbasetemp() / "vlmkit-cache"))
    native.reload()
    yield
    monkeypatch.undo()
    native.reload()


@needs_kernels
@pytest.mark.parametrize("rows", [2, 4, 8, 13, 16])  # the 4-row and 8-row kernels, their tails, MAX_ROWS
@pytest.mark.parametrize("shape", [(7, 33), (1003, 577), (70, 64)], ids=["7x33", "1003x577", "70x64"])
def test_several_rows_match_torch(shape, rows):
    assert native.available(), native.status()
    out, inp = shape
    g = torch.Generator().manual_seed(out + rows)
    w, x, b = torch.randn(out, inp, generator=g), torch.randn(rows, inp, generator=g), torch.randn(out, generator=g)
    got = native.gemm_rows(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5 * inp**0.5)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_f32_and_i8_match_torch(shape, threads):
    assert native.available(), native.status()
    out, inp = shape
    g = torch.Generator().manual_seed(out * 1000 + inp)
    w, x, b = torch.randn(out, inp, generator=g), torch.randn(1, inp, generator=g), torch.randn(out, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.gemv_f32(x, w, b)
        q = quantize_w8(w)
        got8 = native.gemv_i8(x, q["q8"], q["scale"], None)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, F.linear(x, w, b)[0], rtol=1e-5, atol=1e-5 * inp**0.5)
    assert q["scale"].shape == (out, inp // 32 if inp % 32 == 0 else 1)  # per 32 inputs, else per row
    want8 = F.linear(x, dequantize(q))[0]
    torch.testing.assert_close(got8, want8, rtol=1e-5, atol=1e-5 * inp**0.5)


@needs_kernels
@pytest.mark.parametrize("group", [32, 64, 96])  # 32: the constant-size path; 64, 96: group as a run-time value
def test_i8_with_each_group_size_matches_its_dequantized_weight(group):
    assert native.available(), native.status()
    g = torch.Generator().manual_seed(group)
    out, inp = 13, 576
    q8 = torch.randint(-127, 128, (out, inp), generator=g, dtype=torch.int8)
    scale = torch.rand(out, inp // group, generator=g) + 0.5
    x, b = torch.randn(inp, generator=g), torch.randn(out, generator=g)
    want = F.linear(x, q8.float() * scale.repeat_interleave(group, dim=1), b)
    torch.testing.assert_close(native.gemv_i8(x, q8, scale, b), want, rtol=1e-5, atol=1e-4 * inp**0.5)


@needs_kernels
def test_inputs_the_kernels_do_not_take_return_none():
    assert native.available(), native.status()
    w, x = torch.randn(8, 16), torch.randn(16)
    assert native.gemv_f32(x, w.t().contiguous().t()) is None  # not row-major
    assert native.gemv_f32(x.double(), w.double()) is None
    assert native.gemv_f32(torch.randn(2, 16), w) is None  # two rows: torch's matmul
    q8 = torch.ones(8, 64, dtype=torch.int8)
    x64 = torch.randn(64)
    assert native.gemv_i8(x, w, torch.ones(8, 1)) is None  # float weight for the int8 kernel
    assert native.gemv_i8(x64, q8, torch.ones(8, 1, dtype=torch.float16)) is None  # float16 scales: not w8's layout
    assert native.gemv_i8(x64, q8, torch.ones(8)) is None  # one scale per row as a vector: the old layout
    assert native.gemv_i8(x64, q8, torch.ones(8, 4)) is None  # groups of 16: not a size it takes
    assert native.gemv_i8(x64, q8, torch.ones(8, 2)) is not None
    with pytest.raises(ValueError, match="bias must be a contiguous float32"):
        native.gemv_f32(x, w, torch.ones(7))


@needs_kernels
def test_decode_paths_use_the_kernels_and_disabled_switches_them_off(monkeypatch):
    assert native.available(), native.status()
    calls = []
    real = native.gemv_f32

    def counted(*args):
        y = real(*args)
        if y is not None:
            calls.append(1)
        return y

    monkeypatch.setattr(native, "gemv_f32", counted)
    layer = GemvLinear.from_linear(torch.nn.Linear(16, 8))
    x = torch.randn(1, 1, 16)
    with torch.inference_mode():
        want = F.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), want)
        assert calls == [1]
        with native.disabled():
            assert not native.available() and native.status().startswith("off")
            torch.testing.assert_close(linear_rows(x, layer.weight, layer.bias), want)
        assert native.available()
    # under autograd a one-row call keeps torch's differentiable product
    y = layer(torch.randn(1, 16, requires_grad=True))
    assert y.requires_grad and calls == [1]  # not the kernel: it has no backward
    y.sum().backward()
    assert layer.weight.grad is not None


@needs_kernels
@pytest.mark.parametrize("inp", [40, 96])  # one scale per row; three groups of 32
def test_w8_decode_row_runs_the_int8_kernel(inp):
    assert native.available(), native.status()
    lin = torch.nn.Linear(inp, 12)
    layer = WeightOnlyLinear.from_linear(lin, "w8")
    x = torch.randn(1, inp)
    want = F.linear(x, dequantize(layer.quantized), lin.bias)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
        with native.disabled():  # torch on the widened copy: same values
            torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_second_load_reuses_the_compiled_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path))
    assert native.reload(), native.status()
    built = sorted((tmp_path / "native").glob("gemv-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    runs = []
    real_run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda args, **kw: runs.append(args) or real_run(args, **kw))
    assert native.reload(), native.status()
    assert built[0].stat().st_mtime_ns == stamp and built[0].name in native.status()
    assert runs and all("-o" not in args for args in runs)  # asked the compiler's version, compiled nothing


def test_no_compiler_is_reported_and_torch_keeps_working(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "vlmkit-no-such-cc")
    with caplog.at_level(logging.WARNING, logger="vlmkit.native"):
        assert not native.reload()
    assert "no C compiler (vlmkit-no-such-cc not on PATH)" in native.status()
    assert "native kernels unavailable" in caplog.text and "use torch's kernels" in caplog.text
    w, x = torch.randn(6, 10), torch.randn(1, 10)
    torch.testing.assert_close(linear_rows(x, w), F.linear(x, w))


def test_a_compiler_that_fails_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "bad-cc"
    fake.write_text("#!/bin/sh\necho 'bad-cc: error: this compiler always fails' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(fake))
    assert not native.reload()
    why = native.status()
    assert "could not compile gemv.c" in why and "this compiler always fails" in why
    assert not list((tmp_path / "native").glob("*.so"))  # no half-written file left behind


def test_environment_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("VLMKIT_NATIVE", "0")
    assert not native.reload()
    assert native.status().startswith("off")
    assert native.gemv_f32(torch.randn(4), torch.randn(3, 4)) is None


# group 32 runs as a compile-time constant (scales widened 8 at a time: 576 / 32 = 18 groups is
# two such passes and a tail), other groups as a run-time value
Q4_SHAPES = [(1, 32, 32), (5, 64, 32), (9, 576, 32), (7, 192, 64), (130, 576, 64), (33, 1536, 128)]


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", Q4_SHAPES, ids=[f"{o}x{i}g{g}" for o, i, g in Q4_SHAPES])
def test_q4_matches_its_dequantized_weight(shape, threads):
    assert native.available(), native.status()
    out, inp, group = shape
    g = torch.Generator().manual_seed(out + inp)
    w, x, b = torch.randn(out, inp, generator=g), torch.randn(1, inp, generator=g), torch.randn(out, generator=g)
    q = quantize_w4(w, group)
    deq = dequantize(q)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.gemv_q4(x, q["q4"], q["scale"], q["lo"], group, b)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, F.linear(x, deq, b)[0], rtol=1e-5, atol=1e-5 * inp**0.5)
    assert native.gemv_q4(x, q["q4"], q["scale"], q["lo"], group + 1) is None  # not a group size it takes


@needs_kernels
def test_w4_layer_gives_the_same_values_with_and_without_the_kernel():
    assert native.available(), native.status()
    lin = torch.nn.Linear(128, 32)  # torch's int4 packing takes multiples of 16 outputs
    layer = WeightOnlyLinear.from_linear(lin, "w4")
    x = torch.randn(1, 1, 128)
    with torch.inference_mode():
        mine = layer(x)
        assert layer.torch_w4 is None  # torch's repacked copy is made only when it is needed
        with native.disabled():
            theirs = layer(x)
        assert layer.torch_w4 is not None
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_a_broken_cached_library_is_reported_and_removed(tmp_path, monkeypatch):
    good, bad = tmp_path / "good", tmp_path / "bad"
    monkeypatch.setenv("VLMKIT_CACHE", str(good))
    assert native.reload(), native.status()
    (built,) = (good / "native").glob("gemv-*.so")
    (bad / "native").mkdir(parents=True)
    broken = bad / "native" / built.name  # the name this machine's build has, never loaded
    broken.write_bytes(b"not a shared library")
    monkeypatch.setenv("VLMKIT_CACHE", str(bad))
    assert not native.reload()
    assert "cannot load" in native.status() and not broken.exists()
    assert native.reload(), native.status()  # rebuilt on the next try


@needs_kernels
def test_int8_kernel_passes_nan_and_inf_through():
    assert native.available(), native.status()
    q = quantize_w8(torch.randn(8, 64))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(64)
        x[5] = bad
        y = native.gemv_i8(x, q["q8"], q["scale"])
        assert not torch.isfinite(y).all()  # never silently finite: the decode loop's check sees it


@needs_kernels
def test_attention_exponential_is_within_a_float32_step_of_exp():
    """Attention's softmax takes e^(score - max) eight or sixteen at a time (a Taylor series after
    range reduction): within 1.5e-7 relative of float64 exp over [-87, 0], 1 at 0, NaN for NaN,
    and a value too small to move a sum (< 2e-38) below -87."""
    lib = native.library()
    assert lib is not None, native.status()
    x = torch.cat([torch.linspace(-87.0, 0.0, 1_000_003), torch.tensor([-0.0, -1e-30, -0.34657359, -0.34657360])])
    y = torch.empty_like(x)
    lib.vlmkit_exp_neg(x.data_ptr(), y.data_ptr(), x.numel())
    ref = torch.exp(x.double())
    assert ((y.double() - ref).abs() / ref).max().item() < 1.5e-7
    assert y[-4].item() == 1.0 and y[-3].item() == 1.0
    odd = torch.tensor([float("nan"), -88.0, -1000.0, float("-inf")] * 4)  # 16 lanes: the vector path
    out = torch.empty_like(odd)
    lib.vlmkit_exp_neg(odd.data_ptr(), out.data_ptr(), odd.numel())
    assert torch.isnan(out[0::4]).all()
    assert ((out[1::4] >= 0) & (out[1::4] < 2e-38)).all() and ((out[2::4] >= 0) & (out[2::4] < 2e-38)).all()
    assert ((out[3::4] >= 0) & (out[3::4] < 2e-38)).all()


@needs_kernels
def test_the_steps_silu_is_within_float32_rounding_of_torchs():
    """The decode step's ``silu(gate) * up`` (vector e^-|g| on both signs) against float64, over
    gates from -100 to 100 (both tails, where ``e^-g`` alone would overflow), zeros, inf and NaN."""
    lib = native.library()
    assert lib is not None, native.status()
    g = torch.cat([torch.linspace(-100.0, 100.0, 2_000_003), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.7, -88.7])])
    u = torch.linspace(-2.0, 3.0, g.numel())
    a = torch.empty_like(g)
    lib.vlmkit_silu_mul(g.data_ptr(), u.data_ptr(), a.data_ptr(), g.numel())
    ref = torch.nn.functional.silu(g.double()) * u.double()
    err, big = (a.double() - ref).abs(), ref.abs() > 1e-30  # below: g < -65, where e^-87 stands in for e^g
    assert (err[big] / ref[big].abs()).max().item() < 4e-7 and err[~big].max().item() < 1e-30  # a few float32 roundings
    torch_err = (torch.nn.functional.silu(g) * u).double() - ref
    assert (torch_err[big].abs() / ref[big].abs()).max().item() < 5e-7  # torch's own float32 silu is as close
    odd = torch.tensor([float("nan"), float("inf"), 1.0, -1.0] * 4)  # 16 lanes: the vector path
    out, ones = torch.empty_like(odd), torch.ones_like(odd)  # held: a pointer alone does not keep a tensor alive
    lib.vlmkit_silu_mul(odd.data_ptr(), ones.data_ptr(), out.data_ptr(), odd.numel())
    assert torch.isnan(out[0::4]).all() and torch.isinf(out[1::4]).all()
    silu = torch.nn.functional.silu
    assert torch.allclose(out[2::4], silu(torch.tensor(1.0))) and torch.allclose(out[3::4], silu(torch.tensor(-1.0)))
