"""Generation parity: vlmkit's generate vs transformers' generate on tiny random Idefics3/SmolVLM
checkpoints (same saved weights), and the ``hf_causal_lm`` backbone vs the native ``llama`` one."""

from __future__ import annotations

import json

import pytest
import torch

import vlmkit
from vlmkit import generation
from vlmkit.generation import default_pad_id, default_stop_ids
from vlmkit.hf import spec_from_hf

from .tiny_hf import IMAGE_TOKEN, SHAPES, make_batch, make_checkpoint

transformers = pytest.importorskip("transformers")

NEW = 12


@pytest.fixture(scope="module", params=SHAPES, ids=[s.name for s in SHAPES])
def pair(request, tmp_path_factory):
    shape = request.param
    folder = tmp_path_factory.mktemp(shape.name) / "ckpt"
    hf = make_checkpoint(shape, folder)
    ours = vlmkit.build_from_hf(folder)
    return shape, hf, ours, folder


def _hf_generate(hf, **kw):
    with torch.no_grad():
        return hf.generate(do_sample=False, max_new_tokens=NEW, **kw)


def _text_prompt(batch=1, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, IMAGE_TOKEN - 10, (batch, length), generator=g)


def test_default_stop_and_pad_ids_match_the_checkpoint(pair):
    _, hf, ours, _ = pair
    want = hf.generation_config.eos_token_id
    want = [want] if isinstance(want, int) else list(want)
    assert default_stop_ids(ours)[: len(want)] == want
    assert default_pad_id(ours) == hf.generation_config.pad_token_id


def test_text_only_greedy_matches(pair):
    _, hf, ours, _ = pair
    ids = _text_prompt()
    stops = default_stop_ids(ours)
    want = _hf_generate(hf, input_ids=ids, eos_token_id=stops, pad_token_id=default_pad_id(ours))
    got = ours.generate(ids, max_new_tokens=NEW)  # the defaults
    assert torch.equal(got, want), f"\nvlmkit {got.tolist()}\nhf     {want.tolist()}"
    assert ours.last_generation.path == generation.PATH_DECODE_LOOP


def test_image_prompt_greedy_matches(pair):
    shape, hf, ours, _ = pair
    ids, mask, pixels, pmask = make_batch(shape, images_per_sample=(1,), left_pad=(0,), seed=3)
    kw = dict(attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask, eos_token_id=[299], pad_token_id=0)
    want = _hf_generate(hf, input_ids=ids, **kw)
    got = ours.generate(ids, max_new_tokens=NEW, **kw)
    assert want.shape == (1, ids.shape[1] + NEW)
    assert torch.equal(got, want), f"\nvlmkit {got[:, ids.shape[1]:].tolist()}\nhf     {want[:, ids.shape[1]:].tolist()}"


def _left_padded_image_batch(shape):
    ids, mask, pixels, pmask = make_batch(shape, images_per_sample=(2, 1), left_pad=(0, 0), seed=5)
    assert (mask[1] == 0).any() and (mask[0] == 1).all(), "row 1 must be left-padded"
    return ids, mask, pixels, pmask


def test_left_padded_batch_with_images_matches(pair):
    shape, hf, ours, _ = pair
    ids, mask, pixels, pmask = _left_padded_image_batch(shape)
    kw = dict(attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask, eos_token_id=[299], pad_token_id=0)
    want = _hf_generate(hf, input_ids=ids, **kw)
    got = ours.generate(ids, max_new_tokens=NEW, **kw)
    assert torch.equal(got, want), f"\nvlmkit {got[:, ids.shape[1]:].tolist()}\nhf     {want[:, ids.shape[1]:].tolist()}"


def test_rows_stop_like_transformers(pair):
    shape, hf, ours, _ = pair
    ids, mask, pixels, pmask = _left_padded_image_batch(shape)
    kw = dict(attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask, pad_token_id=0)
    free = ours.generate(ids, max_new_tokens=NEW, eos_token_id=[299], **kw)[:, ids.shape[1] :]
    row1 = free[1].tolist()
    stop = next((t for t in free[0, 2:6].tolist() if t not in row1), None)
    if stop is None:
        pytest.skip("no token that stops row 0 only")
    want = _hf_generate(hf, input_ids=ids, eos_token_id=stop, **kw)
    got = ours.generate(ids, max_new_tokens=NEW, eos_token_id=stop, **kw)
    assert torch.equal(got, want)
    assert (got[0, ids.shape[1] :] == 0).any(), "row 0 stopped and was padded"


def test_position_ids_follow_transformers_on_left_padding(pair):
    """transformers 5: ``cumsum(mask) - 1`` with padding at 0, then last + 1 per new token."""
    shape, hf, ours, _ = pair
    ids, mask, pixels, pmask = _left_padded_image_batch(shape)
    seen_hf, seen_ours = [], []
    h1 = hf.model.text_model.register_forward_pre_hook(
        lambda m, a, kw: seen_hf.append(kw["position_ids"].clone()), with_kwargs=True
    )
    h2 = ours.backbone.register_forward_pre_hook(lambda m, a, kw: seen_ours.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        kw = dict(attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask, eos_token_id=[299], pad_token_id=0)
        _hf_generate(hf, input_ids=ids, **kw)
        ours.generate(ids, max_new_tokens=NEW, **kw)
    finally:
        h1.remove()
        h2.remove()
    assert len(seen_hf) == len(seen_ours) == NEW
    for step, (a, b) in enumerate(zip(seen_hf, seen_ours)):
        assert torch.equal(a.expand_as(b), b), f"step {step}: transformers {a.tolist()} vlmkit {b.tolist()}"
    expected = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    assert torch.equal(seen_ours[0], expected)
    assert seen_ours[1][:, 0].tolist() == (mask.sum(-1)).tolist()


def test_sampling_matches_transformers_with_the_same_seed(pair):
    shape, hf, ours, _ = pair
    ids, mask, pixels, pmask = _left_padded_image_batch(shape)
    kw = dict(attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask, eos_token_id=[299], pad_token_id=0,
              do_sample=True, temperature=0.8, top_k=20, top_p=0.9)  # fmt: skip
    torch.manual_seed(1234)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, max_new_tokens=NEW, **kw)
    got = ours.generate(ids, max_new_tokens=NEW, seed=1234, **kw)
    assert torch.equal(got, want)


# ============================================================================== hf_causal_lm
@pytest.fixture(scope="module")
def hf_backbone_model(pair):
    shape, _, _, folder = pair
    config = json.loads((folder / "config.json").read_text())
    spec = spec_from_hf(folder).to_dict()
    spec["backbone"] = {"name": "hf_causal_lm", "config": config["text_config"],
                        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}  # fmt: skip
    return vlmkit.build(spec)


def test_hf_causal_lm_backbone_generates_the_llama_tokens(pair, hf_backbone_model):
    shape, hf, ours, _ = pair
    alt = hf_backbone_model
    assert type(alt.backbone).__name__ == "HFCausalLMBackbone" and alt.load_report.ok and not alt.untrained_parameters()
    ids, mask, pixels, pmask = _left_padded_image_batch(shape)
    kw = dict(attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask, eos_token_id=[299], pad_token_id=0)
    native = ours.generate(ids, max_new_tokens=NEW, **kw)
    calls = []
    got = alt.generate(ids, max_new_tokens=NEW, streamer=calls.append, **kw)
    assert alt.last_generation.path == generation.PATH_BACKBONE_EMBEDS
    assert torch.equal(got, native)
    assert torch.equal(torch.tensor(calls).T, got[:, ids.shape[1] :])
    text = _text_prompt(seed=4)
    assert torch.equal(alt.generate(text, max_new_tokens=NEW), ours.generate(text, max_new_tokens=NEW))


def test_hf_causal_lm_generic_loop_matches(pair, hf_backbone_model):
    """The protocol methods (forward with a transformers cache, logits) drive vlmkit's own loop too."""
    shape, _, ours, _ = pair
    alt = hf_backbone_model
    ids, mask, pixels, pmask = _left_padded_image_batch(shape)
    with torch.no_grad():
        embeds = alt.embed(ids, pixels, pmask)
    new = generation.generate_from_embeds(alt.backbone, embeds, mask, max_new_tokens=NEW, eos_token_id=[299], pad_token_id=0)
    native = ours.generate(ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pmask, max_new_tokens=NEW,
                           eos_token_id=[299], pad_token_id=0)  # fmt: skip
    assert torch.equal(new, native[:, ids.shape[1] :])
