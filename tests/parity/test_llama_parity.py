"""Numerical parity of vlmkit's LlamaBackbone with transformers' LlamaForCausalLM (fp32, tiny random models).

The transformers model is the oracle: its weights are mapped into the backbone through the
backbone's key map (plain causal-LM layout, prefix ``model.``), exactly as a checkpoint would be.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmkit.components.llama import LlamaBackbone  # noqa: E402

TOL = 1e-4
VOCAB = 97

# name -> (LlamaConfig kwargs shared by both sides)
SHAPES = {
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=112),
    "gqa": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96),
    "mqa": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=80),
    "odd_width": dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=3, head_dim=24, intermediate_size=100),
    "odd_gqa_tied": dict(
        hidden_size=72, num_attention_heads=3, num_key_value_heads=1, head_dim=24, intermediate_size=60,
        tie_word_embeddings=True,
    ),
    "tied_bias": dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=64,
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
    ),
    "llama3_rope": dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        max_position_embeddings=64, rope_theta=500.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
    ),
    "linear_rope_gelu": dict(
        hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
        rope_scaling=dict(type="linear", factor=2.0), hidden_act="gelu_pytorch_tanh",
    ),
}


def _pair(name: str, seed: int = 0):
    """A random transformers LlamaForCausalLM and a LlamaBackbone holding the same weights."""
    kw = dict(vocab_size=VOCAB, num_hidden_layers=3, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, **SHAPES[name])
    hf_kw = dict(kw)
    rope_scaling = hf_kw.pop("rope_scaling", None)
    rope_theta = hf_kw.pop("rope_theta", 10000.0)
    rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    rope_parameters["rope_type"] = rope_parameters.pop("type", rope_parameters["rope_type"])
    config = transformers.LlamaConfig(rope_parameters=rope_parameters, **hf_kw)
    config._attn_implementation = "eager"
    config.initializer_range = 0.2  # peaked attention and O(1) logits, so RoPE or mask slips show up
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # make norms and biases non-trivial so a mix-up would show
        for n, p in hf.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    ours = LlamaBackbone(kw).eval()
    load_via_key_map(ours, hf.state_dict(), prefix="model.")
    return hf, ours


def load_via_key_map(model: LlamaBackbone, checkpoint: dict[str, torch.Tensor], prefix: str) -> None:
    """Fill ``model`` from transformers-named tensors through its key map (fused rules concatenated)."""
    state = {}
    for rule in model.key_map().with_prefixes({"lm_head.": "lm_head.", "": prefix}):
        parts = [checkpoint[s] for s in rule.sources]
        state[rule.local] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    model.load_state_dict(state, strict=True)


def _ours_logits(model, ids, mask=None, pos=None, cache=None):
    return model.logits(model(model.embed(ids), attention_mask=mask, position_ids=pos, cache=cache))


def _padded_batch(side: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = [12, 7, 9, 12]
    T = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n :] = 1
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _maxdiff(a, b, where=None):
    d = (a - b).abs()
    if where is not None:
        d = d[where.bool()]
    return d.max().item()




@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parameter_count_matches(name):
    hf, ours = _pair(name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", sorted(SHAPES))
@torch.no_grad()
def test_full_forward_with_padding(name, side):
    hf, ours = _pair(name)
    ids, mask, pos = _padded_batch(side)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got = _ours_logits(ours, ids, mask, pos)
    assert torch.isfinite(got).all()  # padded rows stay finite too
    d = _maxdiff(got, want, mask)
    assert d < TOL


@pytest.mark.parametrize("name", sorted(SHAPES))
@torch.no_grad()
def test_full_forward_unpadded_default_positions(name):
    hf, ours = _pair(name)
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    want = hf(input_ids=ids).logits
    got = _ours_logits(ours, ids)
    d = _maxdiff(got, want)
    assert d < TOL


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", sorted(SHAPES))
@torch.no_grad()
def test_incremental_decoding_matches_full_forward(name, padding):
    """Prefill, then 5 single-token steps through the KV cache == full-forward logits there."""
    hf, ours = _pair(name)
    steps = 5
    if padding == "none":
        ids = torch.randint(3, VOCAB, (3, 14), generator=torch.Generator().manual_seed(4))
        mask = pos = None
    else:
        ids, mask, pos = _padded_batch(padding)
        if padding == "right":  # pad the decode region too: the cache must also honour 0s in the middle
            extra = torch.randint(3, VOCAB, (ids.shape[0], steps), generator=torch.Generator().manual_seed(5))
            ids = torch.cat([ids, extra], 1)
            mask = torch.cat([mask, torch.ones_like(extra)], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
        else:
            ids, mask, pos = ids, mask, pos
    T = ids.shape[1]
    prompt = T - steps
    full = _ours_logits(ours, ids, mask, pos)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    valid = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    assert _maxdiff(full, want, valid) < TOL

    cache = ours.new_cache(ids.shape[0], T + 3)
    sl = lambda t, a, b: None if t is None else t[:, a:b]  # noqa: E731
    got = [_ours_logits(ours, ids[:, :prompt], sl(mask, 0, prompt), sl(pos, 0, prompt), cache)]
    assert cache.length == prompt
    for t in range(prompt, T):
        got.append(_ours_logits(ours, ids[:, t : t + 1], sl(mask, 0, t + 1), sl(pos, t, t + 1), cache))
    assert cache.length == T
    got = torch.cat(got, 1)
    d_self = _maxdiff(got, full, valid)
    d_hf = _maxdiff(got, want, valid)
    assert d_self < TOL
    assert d_hf < TOL


@pytest.mark.parametrize("name", ["gqa", "odd_gqa_tied", "llama3_rope", "mha"])
@torch.no_grad()
def test_greedy_decode_matches_generate(name):
    hf, ours = _pair(name)
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    new = 10
    want = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new,
        eos_token_id=None, pad_token_id=0,  # no EOS: exactly `new` plain argmax tokens
    )[:, prompt.shape[1]:]
    assert want.shape == (2, new)

    cache = ours.new_cache(prompt.shape[0], prompt.shape[1] + new)
    logits = _ours_logits(ours, prompt, cache=cache)
    tokens = []
    for _ in range(new):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = _ours_logits(ours, nxt, cache=cache)
    got = torch.cat(tokens, 1)
    assert torch.equal(got, want), (got, want)

