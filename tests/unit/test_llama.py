"""Unit tests of the Llama backbone: params, key map, meta loading, KV cache."""

from __future__ import annotations

import pydantic
import pytest
import torch

from vlmkit.components.llama import LlamaBackbone, Params, RMSNorm, vlmkit_register_components
from vlmkit.errors import GenerationError
from vlmkit.kv_cache import GROW_STEP, KVCache
from vlmkit.protocols import Backbone
from vlmkit.registry import Registry

TINY = dict(
    vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=128,
)


def _error(**kw) -> str:
    with pytest.raises(pydantic.ValidationError) as info:
        Params(**{**TINY, **kw})
    return str(info.value)


# ------------------------------------------------------------------------------------------ params
def test_params_defaults_follow_llama_config():
    p = Params()
    assert (p.vocab_size, p.hidden_size, p.intermediate_size, p.num_hidden_layers) == (32000, 4096, 11008, 32)
    assert p.num_key_value_heads == p.num_attention_heads == 32
    assert p.head_dim == 128
    assert p.rms_norm_eps == 1e-5 and p.rope_theta == 10000.0 and p.rope_scaling is None
    assert p.hidden_act == "silu" and p.max_position_embeddings == 2048
    assert (p.pad_token_id, p.bos_token_id, p.eos_token_id) == (None, 1, 2)
    assert not (p.attention_bias or p.mlp_bias or p.tie_word_embeddings)


def test_params_round_trip_and_schema():
    p = Params(**TINY, rope_scaling={"type": "linear", "factor": 2}, eos_token_id=[2, 5])
    again = Params.model_validate(p.model_dump(mode="json"))
    assert again == p
    assert p.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    schema = Params.model_json_schema()
    assert "num_key_value_heads" in schema["properties"]


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(hidden_size=50), ["hidden_size=50", "num_attention_heads=6", "multiple of 6"]),
        (dict(num_key_value_heads=4), ["num_key_value_heads=4", "num_attention_heads=6", "[1, 2, 3, 6]"]),
        (dict(num_key_value_heads=12), ["num_key_value_heads=12"]),
        (dict(hidden_size=0), ["hidden_size", "greater than 0"]),
        (dict(num_hidden_layers=-1), ["num_hidden_layers", "greater than 0"]),
        (dict(intermediate_size=0), ["intermediate_size", "greater than 0"]),
        (dict(hidden_act="tanhh"), ["hidden_act='tanhh'", "silu"]),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["'yarn'", "default, linear, llama3"]),
        (dict(rope_scaling={"factor": 4.0}), ["rope_type", "default, linear, llama3"]),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["missing", "low_freq_factor"]),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}), ["unsupported keys", "beta"]),
        (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), ["factor=-2.0"]),
        (dict(pad_token_id=61), ["pad_token_id=61", "vocab_size=61"]),
        (dict(not_a_field=1), ["not_a_field", "Extra inputs"]),
    ],
)
def test_params_validation_errors(kw, words):
    msg = _error(**kw)
    for w in words:
        assert w in msg, msg


def test_params_explicit_head_dim_need_not_divide_hidden():
    p = Params(**{**TINY, "hidden_size": 50, "head_dim": 16})
    assert p.head_dim == 16 and p.num_key_value_heads == 2


def test_params_rope_forms():
    l3 = {"rope_type": "llama3", "factor": 32, "low_freq_factor": 1, "high_freq_factor": 4}
    p = Params(**TINY, rope_scaling=l3)
    assert p.rope_scaling["original_max_position_embeddings"] == 128  # defaults to max_position_embeddings
    assert Params(**TINY, rope_scaling={"type": "default"}).rope_scaling is None
    # transformers 5's rope_parameters (rope_theta inside) is split into the two fields
    q = Params(**TINY, rope_parameters={"rope_theta": 500000.0, **l3})
    assert q.rope_theta == 500000.0 and q.rope_scaling == p.rope_scaling
    assert Params(**TINY, rope_parameters={"rope_theta": 7.0, "rope_type": "default"}).rope_scaling is None


def test_params_from_smolvlm_text_config():
    import json
    from pathlib import Path

    import vlmkit

    folder = Path(vlmkit.__file__).parent / "data" / "hf-configs" / "SmolVLM-256M-Instruct"
    text = json.loads((folder / "config.json").read_text())["text_config"]
    p = Params.from_hf(text)
    assert (p.hidden_size, p.num_hidden_layers, p.num_attention_heads, p.num_key_value_heads) == (576, 30, 9, 3)
    assert (p.head_dim, p.vocab_size, p.rope_theta, p.rms_norm_eps) == (64, 49280, 100000.0, 1e-5)
    assert p.tie_word_embeddings is False and p.rope_scaling is None and p.pad_token_id == 2


# ------------------------------------------------------------------------------------------ module
transformers = pytest.importorskip("transformers")


def _hf(tied: bool, bias: bool = False, **extra):
    cfg = transformers.LlamaConfig(
        **TINY, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias, rms_norm_eps=1e-5, **extra
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ours(tied: bool, bias: bool = False, cls=LlamaBackbone):
    return cls({**TINY, "tie_word_embeddings": tied, "attention_bias": bias, "mlp_bias": bias}).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_equals_transformers(tied):
    n_ours = sum(p.numel() for p in _ours(tied).parameters())
    n_hf = sum(p.numel() for p in _hf(tied).parameters())
    assert n_ours == n_hf


def test_is_a_backbone_and_registers():
    model = _ours(False)
    assert isinstance(model, Backbone)
    assert (model.hidden_size, model.vocab_size) == (48, 61)
    registry = Registry()
    vlmkit_register_components(registry)
    assert registry.get("backbone", "llama").cls is LlamaBackbone


def test_no_buffers():
    assert list(_ours(False).buffers()) == []


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_key_map_covers_state_dict_and_exports_transformers_layout(tied, bias):
    hf = _hf(tied, bias)
    hf_sd = hf.state_dict()
    if tied:
        hf_sd.pop("lm_head.weight")  # a tied head is not stored in a checkpoint
    model = _ours(tied, bias)
    km = model.key_map().with_prefixes({"lm_head.": "lm_head.", "": "model."})  # a LlamaForCausalLM file
    assert [r.local for r in km] and {r.local for r in km} == set(model.state_dict())
    assert sorted(km.checkpoint_keys()) == sorted(hf_sd)
    assert ("lm_head.weight" in model.state_dict()) is (not tied)
    # load through the fused rules, then export back: transformers' keys, shapes and values
    state = {r.local: torch.cat([hf_sd[s] for s in r.sources]) for r in km}
    model.load_state_dict(state, strict=True)
    exported = km.export(model.state_dict())
    assert sorted(exported) == sorted(hf_sd)
    for key, tensor in hf_sd.items():
        assert exported[key].shape == tensor.shape, key
        assert torch.equal(exported[key], tensor), key


def test_key_map_is_prefix_free_and_the_family_places_it():
    from vlmkit.family import family_for_config

    model = _ours(False)
    assert model.key_map().checkpoint_keys()[0] == "embed_tokens.weight"
    keys = family_for_config({"model_type": "idefics3"}).key_map("backbone", model.key_map()).checkpoint_keys()
    assert "model.text_model.embed_tokens.weight" in keys
    assert "model.text_model.layers.1.self_attn.v_proj.weight" in keys
    assert "model.text_model.norm.weight" in keys and "lm_head.weight" in keys
    fused = {r.local: r for r in model.key_map()}["layers.0.self_attn.qkv_proj.weight"]
    assert fused.rows == (48, 16, 16)
    assert {r.local: r for r in model.key_map()}["layers.0.mlp.gate_up_proj.weight"].rows == (80, 80)
    keys = model.key_map().with_prefixes({"lm_head.": "output.", "": "model."}).checkpoint_keys()
    assert "model.layers.0.mlp.up_proj.weight" in keys and "output.weight" in keys
    assert "lm_head.weight" not in _ours(True).key_map().checkpoint_keys()


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_meta_build_and_assign_load(tied):
    ref = _ours(tied)
    ids = torch.randint(0, 61, (2, 9))
    want = ref.logits(ref(ref.embed(ids)))
    with torch.device("meta"):
        model = _ours(tied)
    assert all(p.is_meta for p in model.parameters())
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    model.load_state_dict(state, assign=True, strict=True)
    assert not any(p.is_meta for p in model.parameters())
    got = model.logits(model(model.embed(ids)))
    assert torch.equal(got, want)
    if tied:
        assert model.embed_tokens.weight.data_ptr() == state["embed_tokens.weight"].data_ptr()


@torch.no_grad()
def test_cache_grows_on_demand_and_not_per_step():
    model = _ours(False)
    cache = model.new_cache(2, 1000)
    assert isinstance(cache, KVCache)
    assert cache.keys.shape == (2, 2, 2, 0, 8) and cache.values.shape == cache.keys.shape  # nothing yet
    assert cache.dtype == torch.float32 and cache.length == 0 and cache.max_length == 1000
    ids = torch.randint(0, 61, (2, 5))
    model(model.embed(ids), cache=cache)
    assert cache.length == 5 and cache.capacity == 5 + GROW_STEP  # what was written plus headroom
    ptrs = (cache.keys.data_ptr(), cache.values.data_ptr())
    for step in range(6):
        model(model.embed(ids[:, :1]), cache=cache)
        assert (cache.keys.data_ptr(), cache.values.data_ptr()) == ptrs  # no reallocation per step
        assert cache.length == 6 + step
    assert cache.keys[:, :, :, 11:].abs().sum() == 0  # nothing written past the filled part
    assert cache.keys[:, :, :, :11].abs().sum() > 0
    kept = cache.keys[:, :, :, :11].clone()
    model(model.embed(torch.randint(0, 61, (2, GROW_STEP))), cache=cache)  # past the headroom: grows
    assert cache.capacity >= 11 + GROW_STEP and torch.equal(cache.keys[:, :, :, :11], kept)
    with pytest.raises(GenerationError, match="full"):
        model(model.embed(torch.randint(0, 61, (2, 1000))), cache=cache)
    assert cache.length == 11 + GROW_STEP  # a refused step changes nothing
    with pytest.raises(GenerationError, match="batch"):
        model(model.embed(ids[:1, :1]), cache=cache)
    cache.reset()
    assert cache.length == 0


@torch.no_grad()
def test_a_cache_grown_several_times_gives_the_full_forward_logits():
    model = _ours(False)
    n = 2 * GROW_STEP + 60
    ids = torch.randint(0, 61, (2, n))
    full = model.logits(model(model.embed(ids)))
    cache = model.new_cache(2, 4 * GROW_STEP)
    bounds = [0, 5, 6, GROW_STEP + 7, GROW_STEP + 8, n]  # past the first headroom, then past the second
    capacities, parts = [], []
    for a, b in zip(bounds, bounds[1:]):
        parts.append(model.logits(model(model.embed(ids[:, a:b]), cache=cache)))
        capacities.append(cache.capacity)
    assert len(set(capacities)) >= 3  # it was reallocated at least twice
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_new_cache_dtype_device():
    cache = _ours(False).new_cache(1, 4, dtype=torch.bfloat16, device="cpu")
    assert cache.dtype == torch.bfloat16 and cache.device.type == "cpu" and cache.max_length == 4


@torch.no_grad()
def test_chunked_prefill_and_explicit_positions_match_full_forward():
    model = _ours(False)
    ids = torch.randint(0, 61, (2, 12))
    full = model.logits(model(model.embed(ids)))
    cache = model.new_cache(2, 12)
    parts = [model.logits(model(model.embed(ids[:, a:b]), cache=cache)) for a, b in ((0, 5), (5, 9), (9, 10), (10, 12))]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    pos = torch.arange(12).expand(2, 12)
    assert (model.logits(model(model.embed(ids), position_ids=pos)) - full).abs().max() < 1e-5
    # an all-ones mask is the same as no mask
    mask = torch.ones(2, 12, dtype=torch.long)
    assert (model.logits(model(model.embed(ids), attention_mask=mask)) - full).abs().max() < 1e-5


def test_decode_step_without_padding_builds_no_mask():
    assert LlamaBackbone._mask(None, 2, 1, 7, torch.device("cpu")) == (None, False)
    assert LlamaBackbone._mask(None, 2, 5, 0, torch.device("cpu")) == (None, True)
    assert LlamaBackbone._mask(torch.ones(2, 8), 2, 1, 7, torch.device("cpu")) == (None, False)
    mask, causal = LlamaBackbone._mask(torch.tensor([[0, 1, 1], [1, 1, 1]]), 2, 1, 2, torch.device("cpu"))
    assert not causal and mask.tolist() == [[[[False, True, True]]], [[[True, True, True]]]]
    with pytest.raises(GenerationError, match="attention_mask"):
        LlamaBackbone._mask(torch.ones(2, 5), 2, 1, 7, torch.device("cpu"))


def test_rope_tables_are_lazy_and_grow():
    model = _ours(False)
    assert model._rope_tables == {}
    model(model.embed(torch.randint(0, 61, (1, 3))))
    (cos, _), = model._rope_tables.values()
    n = cos.shape[0]
    model(model.embed(torch.randint(0, 61, (1, n + 1))))
    assert next(iter(model._rope_tables.values()))[0].shape[0] >= n + 1


def test_bf16_rms_norm_matches_transformers_rounding():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, theirs = RMSNorm(40, 1e-5), LlamaRMSNorm(40, eps=1e-5)
    w = 1 + 0.1 * torch.randn(40)
    ours.weight.data.copy_(w)
    theirs.weight.data.copy_(w)
    ours.bfloat16(), theirs.bfloat16()
    x = torch.randn(3, 7, 40).bfloat16()
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours.float()(x.float()), theirs.float()(x.float()))
