"""The Llama decode step in one native call (vlmkit.components.llama_fused) gives the logits of
the module path on every supported layer kind, and falls back to the modules (saying why) for
what it does not run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmkit import native
from vlmkit.components.llama import LlamaBackbone
from vlmkit.components.llama_fused import FusedDecode, plan_of
from vlmkit.decode_layout import prepare_decode
from vlmkit.quant_schemes import quantize
from vlmkit.quantize import quantize_int8

pytestmark = pytest.mark.skipif(not native.available(), reason=f"vlmkit's native kernels: {native.status()}")

BASE = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}  # fmt: skip
VARIANTS = {
    "gqa": {},
    "mha-tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "mqa-biases": {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True},
    "llama3-rope-head-dim-24": {"head_dim": 24, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}},
    # attention weighs the values in whole vectors (8 floats on AVX2, 16 on AVX-512) where the head
    # size allows: 12 is none, so this runs the per-float loop (as 24 does on AVX-512)
    "head-dim-12": {"head_dim": 12},
}  # fmt: skip


def _backbone(**over) -> LlamaBackbone:
    torch.manual_seed(0)
    bb = LlamaBackbone({**BASE, **over}).eval()
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)  # nonzero biases, so a dropped bias shows
            if type(m).__name__ == "RMSNorm":
                m.weight.uniform_(0.5, 1.5)
    return bb


def _steps(bb: LlamaBackbone, prompt: int = 11, steps: int = 6) -> torch.Tensor:
    """``(steps, V)`` logits of greedy one-token steps after a ``prompt``-token prefill."""
    ids = torch.randint(0, bb.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = bb.new_cache(1, prompt + steps)
        last = bb.logits(bb(bb.embed(ids), cache=cache))[:, -1]
        out = []
        for _ in range(steps):
            last = bb.logits(bb(bb.embed(last.argmax(-1, keepdim=True)), cache=cache))[:, -1]
            out.append(last)
    return torch.cat(out)


def _fused_and_modules(bb: LlamaBackbone, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    fused = _steps(bb, **kw)
    assert isinstance(plan_of(bb), FusedDecode), plan_of(bb)
    with native.disabled():
        modules = _steps(bb, **kw)
    assert isinstance(plan_of(bb), str) and "not available" in plan_of(bb)
    return fused, modules


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
@pytest.mark.parametrize("layout", ["rows", "transposed"])
def test_fused_step_equals_the_modules(variant, layout):
    bb = _backbone(**VARIANTS[variant])
    prepare_decode(bb, layout)
    fused, modules = _fused_and_modules(bb)
    assert (fused - modules).abs().max() < 1e-5 * max(1.0, modules.abs().max().item())


@pytest.mark.parametrize("scheme", ["w8", "w4"])
def test_fused_step_runs_weight_only_layers(scheme):
    bb = _backbone(vocab_size=96)  # torch's int4 packing (the comparison) takes multiples of 16 outputs
    wrapper = nn.Module()
    wrapper.backbone = bb
    quantize(wrapper, scheme)
    fused, modules = _fused_and_modules(bb)
    assert (fused - modules).abs().max() < 1e-4 * max(1.0, modules.abs().max().item())


def test_cache_growth_mid_generation_keeps_the_step_exact():
    bb = _backbone()
    # a 250-token prompt allocates 250 + 256 positions; 300 steps grow the cache once on the way
    fused, modules = _fused_and_modules(bb, prompt=250, steps=300)
    assert (fused - modules).abs().max() < 1e-4 * max(1.0, modules.abs().max().item())


@pytest.mark.parametrize("variant", ["gqa", "mha-tied", "mqa-biases", "head-dim-12"])
def test_a_long_cache_attends_in_chunks_as_the_modules_do(variant):
    """Past 256 cached positions the step attends chunk by chunk (600: three chunks of 200 and
    201) and merges the chunks' softmaxes; the logits stay the modules'."""
    bb = _backbone(**VARIANTS[variant])
    fused, modules = _fused_and_modules(bb, prompt=600, steps=2)
    assert (fused - modules).abs().max() < 1e-5 * max(1.0, modules.abs().max().item())


@pytest.mark.parametrize("length", [17, 600])
@pytest.mark.parametrize("B", [1, 2])
def test_the_step_gives_the_same_numbers_on_any_number_of_threads(B, length):
    """Rows split across threads and attention items (query heads grouped by key/value head, or
    one per item when that leaves a thread idle) change the work per thread, never a sum:
    1, 2, 3 and 5 threads give bitwise the same hidden states."""
    bb = _backbone()
    plan = FusedDecode.build(bb)
    g = torch.Generator().manual_seed(3)
    cache = bb.new_cache(B, length + 1)
    cache.grow(length + 1)
    cache.keys.normal_(generator=g)
    cache.values.normal_(generator=g)
    cache.length = length
    h = torch.randn(B, 1, bb.hidden_size, generator=g)
    cos, sin = bb.rope(None, length, 1, torch.device("cpu"), torch.float32)
    before, outs = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            outs.append(plan.step(h, cos, sin, cache))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], out) for out in outs[1:])


def test_what_it_does_not_run_falls_back_to_the_modules_and_says_why():
    gelu = _backbone(hidden_act="gelu")
    _steps(gelu, steps=2)
    assert "hidden_act='gelu'" in plan_of(gelu)
    w8a8 = _backbone()
    wrapper = nn.Module()
    wrapper.backbone = w8a8
    quantize_int8(wrapper, slots=("backbone",))
    _steps(w8a8, steps=2)
    assert plan_of(w8a8) == "layer 0: qkv_proj: Int8Linear is not a linear layer vlmkit's kernels run"


def test_a_hook_or_a_swapped_layer_makes_the_step_use_the_modules():
    bb = _backbone()
    want = _steps(bb)
    seen = []
    handle = bb.layers[1].mlp.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with_hook = _steps(bb)
    assert len(seen) == 1 + 6  # the prefill and every step ran the hooked module
    assert plan_of(bb).startswith("a forward hook on LlamaMLP")
    assert (with_hook - want).abs().max() < 1e-5
    handle.remove()
    _steps(bb)
    assert isinstance(plan_of(bb), FusedDecode)
    plan = plan_of(bb)
    bb.layers[0].self_attn.o_proj = nn.Linear(bb.hidden_size, bb.hidden_size, bias=False)  # a new layer
    assert not plan.current()
    _steps(bb)
    assert plan_of(bb) is not plan and isinstance(plan_of(bb), FusedDecode)


@pytest.mark.parametrize("B", [3, 13])  # 13 = 8 (the eight-row kernel) + 4 (the four-row one) + 1
@pytest.mark.parametrize("scheme", ["fp32", "w8", "w4"])
def test_unpadded_rows_decode_together_as_each_row_alone(scheme, B):
    """A batched step's layers read the same weights a one-row step does (the int8/int4 copy for w8/w4)."""
    bb = _backbone(vocab_size=96)
    if scheme != "fp32":
        wrapper = nn.Module()
        wrapper.backbone = bb
        quantize(wrapper, scheme)
    g = torch.Generator().manual_seed(2)
    ids, steps = torch.randint(0, 96, (B, 7), generator=g), torch.randint(0, 96, (B, 5), generator=g)

    def run(rows):
        with torch.inference_mode():
            cache = bb.new_cache(len(rows), 12)
            bb(bb.embed(ids[rows]), cache=cache)
            # hidden states: the LM head is outside the step (a WeightOnlyLinear head runs its
            # float32 weight for several rows, its int8/int4 copy for one)
            return torch.stack([bb(bb.embed(steps[rows, i : i + 1]), cache=cache)[:, -1] for i in range(5)], 1)

    together = run(list(range(B)))
    assert isinstance(plan_of(bb), FusedDecode)
    with native.disabled():  # each row alone, through the modules and torch's kernels
        alone = torch.cat([run([b]) for b in range(B)])
    assert (together - alone).abs().max() < 1e-4 * max(1.0, alone.abs().max().item())


def test_padded_rows_and_autograd_never_take_the_native_step():
    bb = _backbone().requires_grad_(False)
    with torch.no_grad():
        cache = bb.new_cache(2, 8)
        mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
        bb(bb.embed(torch.tensor([[0, 4, 5], [6, 7, 8]])), attention_mask=mask, cache=cache)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        bb(bb.embed(torch.tensor([[6], [7]])), attention_mask=step_mask, cache=cache)  # padded: the modules
    assert plan_of(bb) is None
    cache = bb.new_cache(1, 8)
    bb(bb.embed(torch.tensor([[3, 4, 5]])), cache=cache)
    out = bb(bb.embed(torch.tensor([[6]])), cache=cache)  # grad mode: the modules
    assert out.shape == (1, 1, bb.hidden_size) and plan_of(bb) is None


def test_the_plan_is_checked_at_the_first_of_a_run_of_steps(monkeypatch):
    """Consecutive steps on one cache check the plan once; a prefill (or a reset) on the same
    cache starts a new run, checked again, so a hook added between generations is seen."""
    bb = _backbone()
    _steps(bb, steps=2)  # a plan exists
    checks = []
    real = FusedDecode.current
    monkeypatch.setattr(FusedDecode, "current", lambda self: checks.append(1) or real(self))
    ids = torch.randint(0, bb.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cache = bb.new_cache(1, 40)
        bb(bb.embed(ids), cache=cache)  # prefill: the modules
        for _ in range(6):
            bb(bb.embed(ids[:, :1]), cache=cache)
        assert checks == []  # a new cache builds a plan (nothing to check)
        plan = plan_of(bb)
        bb(bb.embed(ids), cache=cache)  # a prefill on the same cache
        for _ in range(6):
            bb(bb.embed(ids[:, :1]), cache=cache)
        assert len(checks) == 1 and plan_of(bb) is plan
        seen = []
        handle = bb.layers[0].mlp.register_forward_hook(lambda mod, args, out: seen.append(1))
        cache.reset(cache.length - 3)  # a reset: the next step is not the one after the last
        bb(bb.embed(ids[:, :1]), cache=cache)
        handle.remove()
    assert len(checks) == 2 and seen == [1] and plan_of(bb).startswith("a forward hook on LlamaMLP")
