"""Unit tests of vlmkit.generation: validation, sampling, the fallback chain, streaming, stopping.

The model is a tiny fresh-init VLM (no transformers needed). The fallback-chain test doubles wrap
the model's real LlamaBackbone and compute real outputs with a naive full-recompute loop, so each
path is checked against the fast cached loop.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import vlmkit
from vlmkit import generation
from vlmkit.errors import GenerationError, PackingError
from vlmkit.generation import GenerationInfo, default_pad_id, default_stop_ids, generate, stream

VOCAB = 96
IMAGE = 90  # placeholder id
K = 4  # visual tokens per image: (32 / 8 / 2)^2

TINY = {
    "vision_tower": {"name": "navit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "connector": {"name": "idefics3", "scale_factor": 2},
    "packer": {"name": "image_packer", "image_token_id": IMAGE},
    "backbone": {"name": "llama", "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 96,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "eos_token_id": 2, "pad_token_id": 0, "bos_token_id": 1},
}  # fmt: skip


def _tiny_model(**extra):
    torch.manual_seed(0)
    model = vlmkit.build({**TINY, **extra}, load_weights=False)
    with torch.no_grad():  # sharper logits: greedy choices far from ties
        model.backbone.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


def _ids(batch=1, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 80, (batch, length), generator=g)


def _image_prompt(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, 80, (1, 3), generator=g), torch.full((1, K), IMAGE), torch.randint(3, 80, (1, 2), generator=g)], 1)
    pixels = torch.randn(1, 1, 3, 32, 32, generator=g)
    return ids, pixels


NO_STOP = {"eos_token_id": [], "pad_token_id": 0}


# ============================================================================== validation
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_new_tokens": 0}, ["max_new_tokens", "0", ">= 1"]),
        ({"max_new_tokens": -3}, ["max_new_tokens", "-3"]),
        ({"max_new_tokens": 2.5}, ["max_new_tokens", "2.5"]),
        ({"max_new_tokens": True}, ["max_new_tokens", "True"]),
        ({"do_sample": True, "temperature": 0.0}, ["temperature", "0.0", "> 0"]),
        ({"do_sample": True, "temperature": -1.0}, ["temperature", "-1.0"]),
        ({"temperature": float("nan")}, ["temperature", "nan"]),
        ({"top_k": 0}, ["top_k", "0", ">= 1"]),
        ({"top_k": 1.5}, ["top_k", "1.5"]),
        ({"top_p": 0.0}, ["top_p", "0.0", "(0, 1]"]),
        ({"top_p": 1.5}, ["top_p", "1.5", "(0, 1]"]),
        ({"seed": -1}, ["seed", "-1"]),
        ({"seed": "x"}, ["seed", "'x'"]),
        ({"eos_token_id": VOCAB}, ["eos_token_id", str(VOCAB), f"[0, {VOCAB})"]),
        ({"eos_token_id": [1, -2]}, ["eos_token_id", "-2"]),
        ({"pad_token_id": -1}, ["pad_token_id", "-1"]),
        ({"streamer": 5}, ["streamer", "int"]),
        ({"do_sample": "yes"}, ["do_sample", "'yes'"]),
        ({"allow_text_only": None}, ["allow_text_only"]),
    ],
)
def test_bad_arguments_name_the_value_and_range(model, kwargs, words):
    with pytest.raises(GenerationError) as info:
        generate(model, _ids(), **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_temperature_is_not_checked_when_greedy(model):
    out = generate(model, _ids(), max_new_tokens=2, temperature=0.0, **NO_STOP)
    assert out.shape == (1, 8)


@pytest.mark.parametrize(
    ("ids", "mask", "words"),
    [
        (torch.tensor([1, 2, 3]), None, ["input_ids", "(3,)"]),
        (torch.zeros(1, 0, dtype=torch.long), None, ["at least one token"]),
        (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), ["attention_mask", "(2, 4)"]),
        (torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]), ["rows [1]", "all padding"]),
        (torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 2, 1]]), ["0 (padding) and 1"]),
    ],
)
def test_bad_prompts(model, ids, mask, words):
    with pytest.raises(GenerationError) as info:
        generate(model, ids, attention_mask=mask)
    for word in words:
        assert word in str(info.value)


def test_placeholders_without_pixels_are_a_packing_error(model):
    ids, _ = _image_prompt()
    with pytest.raises(PackingError):
        generate(model, ids, max_new_tokens=2)


# ============================================================================== layout and loop
def test_layout_prompt_then_new_tokens(model):
    ids = _ids(2, 5)
    out = generate(model, ids, max_new_tokens=7, **NO_STOP)
    assert out.dtype == torch.long and out.shape == (2, 12)
    assert torch.equal(out[:, :5], ids)
    assert torch.equal(model.generate(ids, max_new_tokens=7, **NO_STOP), out)  # VLM.generate delegates


def test_fast_loop_equals_naive_recompute(model):
    ids = _ids(2, 5, seed=3)
    out = generate(model, ids, max_new_tokens=8, **NO_STOP)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(8):
            bb = model.backbone  # (not model(seq): a generated id may be the image placeholder)
            logits = bb.logits(bb(bb.embed(seq)))[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_max_new_tokens_one(model):
    out = generate(model, _ids(), max_new_tokens=1, **NO_STOP)
    assert out.shape == (1, 7)
    assert model.last_generation.new_tokens == 1 and model.last_generation.tokens_per_s == 0.0


def test_images_are_encoded_once(model):
    ids, pixels = _image_prompt()
    calls = []
    handle = model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = generate(model, ids, pixel_values=pixels, max_new_tokens=6, **NO_STOP)
    finally:
        handle.remove()
    assert len(calls) == 1 and out.shape == (1, ids.shape[1] + 6)
    # and the images matter: the same prompt with other pixels gives other tokens
    other = generate(model, ids, pixel_values=torch.randn_like(pixels) * 3, max_new_tokens=6, **NO_STOP)
    assert not torch.equal(other, out)


def test_left_padded_rows_equal_their_unpadded_runs(model):
    a, b = _ids(1, 7, seed=1), _ids(1, 4, seed=2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=6, **NO_STOP)
    assert torch.equal(out[0, 7:], generate(model, a, max_new_tokens=6, **NO_STOP)[0, 7:])
    assert torch.equal(out[1, 7:], generate(model, b, max_new_tokens=6, **NO_STOP)[0, 4:])


def test_right_padding_is_left_aligned(model):
    a, b = _ids(1, 7, seed=1), _ids(1, 4, seed=2)
    left = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    right = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
    lmask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    rmask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    lo = generate(model, left, attention_mask=lmask, max_new_tokens=5, **NO_STOP)
    ro = generate(model, right, attention_mask=rmask, max_new_tokens=5, **NO_STOP)
    assert torch.equal(ro[:, :7], right)  # the prompt comes back as given
    assert torch.equal(ro[:, 7:], lo[:, 7:])


# ============================================================================== stopping
def _stop_token_for_row0(seqs: torch.Tensor, step: int) -> int | None:
    tok = int(seqs[0, step])
    if tok in seqs[0, :step].tolist() or tok in seqs[1].tolist():
        return None
    return tok


def test_rows_stop_independently(model):
    for seed in range(20):
        ids = _ids(2, 5, seed=seed)
        free = generate(model, ids, max_new_tokens=8, **NO_STOP)[:, 5:]
        stop = _stop_token_for_row0(free, 2)
        if stop is not None:
            break
    else:
        pytest.skip("no prompt pair with a distinctive token at step 2")
    out = generate(model, ids, max_new_tokens=8, eos_token_id=stop, pad_token_id=0)
    assert out.shape == (2, 13)
    assert out[0, 5:8].tolist() == free[0, :3].tolist()  # row 0 ends with its stop token...
    assert out[0, 8:].tolist() == [0] * 5  # ...then padding
    assert torch.equal(out[1, 5:], free[1])  # row 1 goes on


def test_generation_ends_when_every_row_stopped(model):
    ids = _ids(2, 5, seed=4)
    free = generate(model, ids, max_new_tokens=8, **NO_STOP)[:, 5:]
    stops = [int(free[0, 1]), int(free[1, 1])]
    out = generate(model, ids, max_new_tokens=8, eos_token_id=stops, pad_token_id=0)
    first = [min(i for i in range(8) if int(free[r, i]) in stops) for r in range(2)]
    assert out.shape == (2, 5 + max(first) + 1)
    assert model.last_generation.new_tokens == max(first) + 1


def test_default_stop_and_pad_ids_come_from_the_checkpoint_files(tmp_path):
    import shutil

    from ..conftest import published_folder

    src = published_folder("SmolVLM-256M-Instruct")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json", "preprocessor_config.json"):
        shutil.copyfile(src / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7], "pad_token_id": 3}))
    m = _tiny_model(tokenizer=str(tmp_path))
    # the processor's answer: generation_config's eos, config.json's text eos (2), the family's
    # turn-end token <end_of_utterance> (49279 is outside this tiny model's vocabulary: left out)
    assert default_stop_ids(m) == [5, 7, 2]
    processor = vlmkit.load_processor(tmp_path)
    assert processor.eos_token_ids == [5, 7, 2, 49279]
    # the tokenizer's pad token (<|im_end|>, 2) wins over generation_config.json's 3, as in the processor
    assert default_pad_id(m) == processor.pad_token_id == 2
    bare = _tiny_model()
    assert default_stop_ids(bare) == [2] and default_pad_id(bare) == 0


def test_default_stops_are_used(model):
    ids = _ids(1, 5, seed=5)
    free = generate(model, ids, max_new_tokens=10, **NO_STOP)[0, 5:]
    explicit = generate(model, ids, max_new_tokens=10, eos_token_id=2, pad_token_id=0)
    assert torch.equal(generate(model, ids, max_new_tokens=10), explicit)
    if 2 in free.tolist():
        assert explicit.shape[1] == 5 + free.tolist().index(2) + 1


# ============================================================================== sampling
def test_sampling_with_a_seed_is_reproducible_and_seeds_differ(model):
    ids = _ids(2, 5)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, **NO_STOP)
    state = torch.get_rng_state()
    a = generate(model, ids, seed=1, **kw)
    assert torch.equal(torch.get_rng_state(), state), "a seeded run must not touch the global RNG"
    assert torch.equal(generate(model, ids, seed=1, **kw), a)
    others = [generate(model, ids, seed=s, **kw) for s in (2, 3)]
    assert any(not torch.equal(o, a) for o in others)


@pytest.mark.parametrize("knob", [{"temperature": 1e-4}, {"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5, "temperature": 3.0}])
def test_degenerate_sampling_equals_greedy(model, knob):
    ids = _ids(2, 5, seed=7)
    greedy = generate(model, ids, max_new_tokens=8, **NO_STOP)
    for seed in (0, 1):
        assert torch.equal(generate(model, ids, max_new_tokens=8, do_sample=True, seed=seed, **knob, **NO_STOP), greedy)


def test_top_k_and_top_p_restrict_the_choices(model):
    ids = _ids(1, 5, seed=8)
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    top2 = set(logits.topk(2).indices.tolist())
    firsts = {int(generate(model, ids, max_new_tokens=1, do_sample=True, top_k=2, temperature=5.0, seed=s, **NO_STOP)[0, -1]) for s in range(30)}
    assert firsts <= top2 and len(firsts) == 2
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    keep = int((probs[order].cumsum(0) < 0.6).sum()) + 1  # smallest set with mass >= 0.6
    allowed = set(order[:keep].tolist())
    firsts = {int(generate(model, ids, max_new_tokens=1, do_sample=True, top_p=0.6, seed=s, **NO_STOP)[0, -1]) for s in range(30)}
    assert firsts <= allowed


# ============================================================================== streaming
def test_callable_streamer_gets_exactly_the_new_tokens(model):
    ids = _ids(2, 5, seed=9)
    calls: list[list[int]] = []
    out = generate(model, ids, max_new_tokens=6, streamer=calls.append, **NO_STOP)
    assert len(calls) == 6 and all(len(c) == 2 for c in calls)
    assert torch.equal(torch.tensor(calls).T, out[:, 5:])


def test_streamer_sees_padding_after_a_row_stops(model):
    ids = _ids(1, 5, seed=10)
    free = generate(model, ids, max_new_tokens=6, **NO_STOP)[0, 5:]
    calls: list[list[int]] = []
    out = generate(model, ids, max_new_tokens=6, eos_token_id=int(free[1]), pad_token_id=0, streamer=calls.append)
    assert [c[0] for c in calls] == out[0, 5:].tolist()


class _PutEnd:
    def __init__(self):
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_put_end_streamer_follows_the_transformers_protocol(model):
    ids = _ids(1, 5, seed=11)
    s = _PutEnd()
    out = generate(model, ids, max_new_tokens=4, streamer=s, **NO_STOP)
    assert torch.equal(s.puts[0], ids)  # the prompt first, as transformers' generate(input_ids=...)
    assert [int(p) for p in s.puts[1:]] == out[0, 5:].tolist()
    assert s.ended == 1


class _Decoder:
    """Decodes ids as space-separated words (a stand-in processor for stream())."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f" w{i}" for i in ids)


def test_stream_yields_the_decoded_text(model):
    ids = _ids(1, 5, seed=12)
    free = generate(model, ids, max_new_tokens=6, **NO_STOP)[0, 5:].tolist()
    chunks = list(stream(model, ids, processor=_Decoder(), max_new_tokens=6, eos_token_id=[]))
    assert len(chunks) == 6 and "".join(chunks) == _Decoder().decode(free)
    assert model.last_generation.new_tokens == 6
    # stop tokens are not part of the text
    chunks = list(stream(model, ids, processor=_Decoder(), max_new_tokens=6, eos_token_id=free[2]))
    assert "".join(chunks) == _Decoder().decode(free[:2])


def test_stream_can_be_abandoned_and_checks_eagerly(model):
    ids = _ids(1, 5, seed=13)
    it = stream(model, ids, processor=_Decoder(), max_new_tokens=50, eos_token_id=[])
    assert next(it).startswith(" w")
    it.close()  # stops the worker thread after its current step
    with pytest.raises(GenerationError, match="one prompt row"):
        stream(model, _ids(2, 5), processor=_Decoder())
    with pytest.raises(GenerationError, match="max_new_tokens"):
        stream(model, ids, processor=_Decoder(), max_new_tokens=0)


def test_stream_raises_errors_from_the_worker(model):
    ids, _ = _image_prompt()
    with pytest.raises(PackingError):
        list(stream(model, ids, processor=_Decoder(), max_new_tokens=3))


# ============================================================================== the fallback chain
def _naive_greedy(inner, embeds, mask, max_new_tokens, eos, pad):
    """Full recompute each step, positions from the mask (cumsum - 1): an independent reference."""
    B = embeds.shape[0]
    mask = torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask.long()
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    done = torch.zeros(B, dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        tok = inner.logits(inner(embeds, attention_mask=mask, position_ids=pos))[:, -1].argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        new.append(tok)
        done |= torch.isin(tok, torch.tensor(eos, dtype=torch.long))
        if bool(done.all()):
            break
        embeds = torch.cat([embeds, inner.embed(tok[:, None])], 1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
    return torch.stack(new, 1)


class _Wrapped(nn.Module):
    """Shares a real LlamaBackbone's weights; offers only what a subclass adds on top of embed."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.params = inner.params
        self.hidden_size, self.vocab_size = inner.hidden_size, inner.vocab_size

    def embed(self, input_ids):
        return self.inner.embed(input_ids)

    def key_map(self):
        return self.inner.key_map()


class HFStyleEmbedsBackbone(_Wrapped):
    """Step 2: a transformers-style generate(inputs_embeds=...) that returns only new tokens."""

    def generate(self, inputs_embeds=None, attention_mask=None, **kw):
        streamer = kw.get("streamer")
        if streamer is not None:
            streamer.put(torch.zeros(inputs_embeds.shape[0], 0, dtype=torch.long))
        new = _naive_greedy(self.inner, inputs_embeds, attention_mask, kw["max_new_tokens"], kw["eos_token_id"], kw["pad_token_id"])
        if streamer is not None:
            for col in new.unbind(1):
                streamer.put(col)
            streamer.end()
        return new


class TextOnlyBackbone(_Wrapped):
    """Step 3: generate(input_ids=...) only, returning prompt + new tokens (transformers' layout)."""

    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, eos_token_id=None,
                 pad_token_id=None, streamer=None):  # fmt: skip
        new = _naive_greedy(self.inner, self.inner.embed(input_ids), attention_mask, max_new_tokens, eos_token_id, pad_token_id)
        return torch.cat([input_ids, new], 1)  # does not stream: generate() delivers the tokens afterwards


class ProtocolOnlyBackbone(_Wrapped):
    """Step 4: only embed/forward/logits (no cache, no generate)."""

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None):
        return self.inner(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids)

    def logits(self, hidden):
        return self.inner.logits(hidden)


class OwnLoopBackbone(ProtocolOnlyBackbone):
    """Step 1: a backbone with its own ``generate_from_embeds`` (here: the generic loop, as a
    third-party backbone might wrap it)."""

    def generate_from_embeds(self, inputs_embeds, attention_mask=None, **gen):
        return generation.generate_from_embeds(self, inputs_embeds, attention_mask, **gen)


@pytest.fixture()
def swap(model):
    original = model.backbone

    def put(cls):
        model.backbone = cls(original)
        return model

    yield put
    model.backbone = original


def _padded_batch(side="left"):
    a, b = _ids(1, 7, seed=21), _ids(1, 4, seed=22)
    pad = torch.zeros(1, 3, dtype=torch.long)
    row = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    mask = [0, 0, 0, 1, 1, 1, 1] if side == "left" else [1, 1, 1, 1, 0, 0, 0]
    return torch.cat([a, row]), torch.tensor([[1] * 7, mask])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    ("cls", "path"),
    [
        (OwnLoopBackbone, generation.PATH_EMBEDS),
        (HFStyleEmbedsBackbone, generation.PATH_BACKBONE_EMBEDS),
        (TextOnlyBackbone, generation.PATH_TEXT_ONLY),
        (ProtocolOnlyBackbone, generation.PATH_DECODE_LOOP),
    ],
)
def test_each_fallback_step_gives_the_native_tokens(model, swap, cls, path, side):
    ids, mask = _padded_batch(side)
    kw = dict(attention_mask=mask, max_new_tokens=7, eos_token_id=[int(ids[0, 3])], pad_token_id=0)
    native = generate(model, *_padded_batch("left")[:1], **{**kw, "attention_mask": _padded_batch("left")[1]})
    assert model.last_generation.path == generation.PATH_DECODE_LOOP  # llama: vlmkit's own loop
    swapped = swap(cls)
    calls: list[list[int]] = []
    got = generate(swapped, ids, streamer=calls.append, **kw)
    assert swapped.last_generation.path == path
    assert torch.equal(got[:, : ids.shape[1]], ids)  # the prompt as given
    assert torch.equal(got[:, ids.shape[1] :], native[:, ids.shape[1] :])
    assert torch.equal(torch.tensor(calls).T, got[:, ids.shape[1] :])


def test_fallback_with_images_keeps_them_when_the_backbone_takes_embeddings(model, swap):
    ids, pixels = _image_prompt(seed=3)
    native = generate(model, ids, pixel_values=pixels, max_new_tokens=5, **NO_STOP)
    for cls in (HFStyleEmbedsBackbone, ProtocolOnlyBackbone):
        m = swap(cls)
        assert torch.equal(generate(m, ids, pixel_values=pixels, max_new_tokens=5, **NO_STOP), native)
        assert not m.last_generation.images_dropped


def test_text_only_path_drops_images_with_a_warning(model, swap):
    ids, pixels = _image_prompt(seed=4)
    stripped = ids[ids != IMAGE][None]
    want_new = generate(model, stripped, max_new_tokens=5, **NO_STOP)[:, stripped.shape[1] :]
    m = swap(TextOnlyBackbone)
    with pytest.warns(UserWarning, match="images were dropped"):
        out = generate(m, ids, pixel_values=pixels, max_new_tokens=5, **NO_STOP)
    assert torch.equal(out[:, : ids.shape[1]], ids)  # the prompt as given, placeholders included
    assert torch.equal(out[:, ids.shape[1] :], want_new)
    assert m.last_generation.path == generation.PATH_TEXT_ONLY and m.last_generation.images_dropped
    with pytest.raises(GenerationError, match="allow_text_only=False"):
        generate(m, ids, pixel_values=pixels, max_new_tokens=5, allow_text_only=False, **NO_STOP)


def test_text_only_path_without_images_is_silent(model, swap):
    m = swap(TextOnlyBackbone)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = generate(m, _ids(), max_new_tokens=3, allow_text_only=False, **NO_STOP)
    assert out.shape == (1, 9) and not m.last_generation.images_dropped


def test_generation_info_is_recorded_and_logged(model, caplog):
    with caplog.at_level(logging.INFO, logger="vlmkit.generation"):
        generate(model, _ids(2, 5), max_new_tokens=5, **NO_STOP)
    info = model.last_generation
    assert isinstance(info, GenerationInfo)
    assert info.path == generation.PATH_DECODE_LOOP and info.new_tokens == 5 and info.batch_size == 2 and info.prompt_tokens == 5
    assert info.prefill_s > 0 and info.decode_s > 0 and info.tokens_per_s > 0
    assert any("path=decode_loop" in r.getMessage() for r in caplog.records)


def test_generate_from_embeds_on_llama_returns_new_tokens(model):
    ids = _ids(1, 5, seed=14)
    with torch.no_grad():
        new = generation.generate_from_embeds(model.backbone, model.backbone.embed(ids), None, max_new_tokens=4)
    assert new.shape == (1, 4)
    assert torch.equal(new, generate(model, ids, max_new_tokens=4, **NO_STOP)[:, 5:])


def test_vlmkit_import_does_not_import_transformers():
    code = (
        "import sys, vlmkit, vlmkit.generation, vlmkit.components.hf_causal_lm\n"
        "from vlmkit.plugins import get_registry\n"
        "assert 'hf_causal_lm' in get_registry().names('backbone')\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
