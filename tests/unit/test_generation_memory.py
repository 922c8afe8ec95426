"""Generation memory follows the tokens made, not ``max_new_tokens``; the context bounds the
request before anything is allocated; NaN logits stop with an error; a filled cache continues.

Tiny fresh-init model, no transformers. Peak memory is measured in a subprocess (``ru_maxrss``)
on a model big enough that a preallocated cache would show.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import vlmkit
from vlmkit.errors import GenerationError
from vlmkit.generation import generate, generate_from_embeds
from vlmkit.kv_cache import GROW_STEP

from .test_generation import TINY as BASE

#: test_generation's tiny spec with a 4096-token context (the bound these tests hit).
TINY = {**BASE, "backbone": {**BASE["backbone"], "max_position_embeddings": 4096}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = vlmkit.build(TINY, load_weights=False)
    with torch.no_grad():
        m.backbone.lm_head.weight.mul_(8.0)
    return m


def _spy_caches(model, monkeypatch):
    made = []
    real = model.backbone.new_cache

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(model.backbone, "new_cache", spy)
    return made


def test_cache_holds_what_was_made_not_what_was_asked(model, monkeypatch):
    made = _spy_caches(model, monkeypatch)
    ids = torch.randint(3, 80, (2, 7), generator=torch.Generator().manual_seed(1))
    first = generate(model, ids, max_new_tokens=1, eos_token_id=[])[:, -1]
    out = generate(model, ids, max_new_tokens=4000, eos_token_id=first.tolist())  # stops at once
    assert out.shape == (2, 8) and torch.equal(out[:, -1], first)
    assert made[-1].max_length == 7 + 4000 and made[-1].capacity <= 7 + GROW_STEP


def test_long_run_grows_and_matches_a_short_run(model, monkeypatch):
    made = _spy_caches(model, monkeypatch)
    ids = torch.randint(3, 80, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a padded row: the mask and positions grow too
    n = GROW_STEP + 40
    long = generate(model, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
    assert made[-1].capacity >= 5 + n - 1  # it grew past the first headroom
    short = generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(long[:, : short.shape[1]], short)


def test_context_is_checked_before_anything_runs(model, monkeypatch):
    made = _spy_caches(model, monkeypatch)
    ids = torch.randint(3, 80, (1, 10))
    with pytest.raises(GenerationError, match=r"\(10 tokens\) \+ max_new_tokens \(10000000\).*4096") as err:
        generate(model, ids, max_new_tokens=10**7)
    assert "max_new_tokens <= 4086" in str(err.value)
    with pytest.raises(GenerationError, match="no room for an answer"):
        generate(model, torch.randint(3, 80, (1, 4096)), max_new_tokens=1)
    embeds = model.backbone.embed(ids)
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        generate_from_embeds(model.backbone, embeds, max_new_tokens=4087)
    assert made == []  # refused before any cache was made


def test_nan_logits_stop_with_an_error(model):
    bad = vlmkit.build(TINY, load_weights=False)
    with torch.no_grad():
        bad.backbone.norm.weight.fill_(float("nan"))
    with pytest.raises(GenerationError, match="NaN or infinite logits at new token 0") as err:
        generate(bad, torch.randint(3, 80, (1, 4)), max_new_tokens=3)
    assert "inspect --check" in str(err.value)


def test_a_filled_cache_continues_the_conversation(model):
    bb = model.backbone
    g = torch.Generator().manual_seed(3)
    turn1, turn2 = torch.randint(3, 80, (1, 9), generator=g), torch.randint(3, 80, (1, 6), generator=g)
    cache = bb.new_cache(1, 200)
    new1 = generate_from_embeds(bb, bb.embed(turn1), max_new_tokens=5, cache=cache)
    assert cache.length == 9 + 5 - 1  # the last new token was never fed back
    fed = torch.cat([turn1, new1[:, :-1]], 1)
    rest = torch.cat([new1[:, -1:], turn2], 1)  # the next turn starts with the unfed token
    new2 = generate_from_embeds(bb, bb.embed(rest), max_new_tokens=6, cache=cache)
    whole = generate_from_embeds(bb, bb.embed(torch.cat([fed, rest], 1)), max_new_tokens=6)
    assert torch.equal(new2, whole)
    cache.reset(8)  # rewind into the first prompt: feeding its last token again gives the first answer
    again = generate_from_embeds(bb, bb.embed(turn1[:, -1:]), max_new_tokens=5, cache=cache)
    assert torch.equal(again, new1)


def test_cache_arguments_are_checked(model):
    bb = model.backbone
    embeds = bb.embed(torch.randint(3, 80, (2, 4)))
    with pytest.raises(GenerationError, match="KVCache"):
        generate_from_embeds(bb, embeds, cache=object())
    with pytest.raises(GenerationError, match="holds 1 rows"):
        generate_from_embeds(bb, embeds, cache=bb.new_cache(1, 50))
    cache = bb.new_cache(2, 50)
    generate_from_embeds(bb, embeds, max_new_tokens=2, cache=cache)
    with pytest.raises(GenerationError, match="unpadded"):
        generate_from_embeds(bb, embeds, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), cache=cache)


_PEAK = r"""
import json, resource, sys, torch, vlmkit
from vlmkit.generation import generate
torch.set_num_threads(1)
spec = json.loads(sys.argv[1]); n = int(sys.argv[2])
torch.manual_seed(0)
model = vlmkit.build(spec, load_weights=False)
ids = torch.randint(3, 80, (1, 16))
first = int(generate(model, ids, max_new_tokens=1, eos_token_id=[])[0, -1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
generate(model, ids, max_new_tokens=n, eos_token_id=[first])
print(json.dumps({"grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""


@pytest.mark.slow
def test_peak_memory_does_not_depend_on_max_new_tokens():
    """A 24-layer backbone, asked for 30,000 tokens and stopping after one: a preallocated cache
    would be 24 x 2 x 8 heads x 64 x 30,016 x 4 bytes = 2.9 GB; it must stay within 50 MB."""
    spec = json.loads(json.dumps(TINY))
    spec["backbone"].update(hidden_size=512, intermediate_size=64, num_hidden_layers=24, num_attention_heads=8,
                            num_key_value_heads=8, max_position_embeddings=32768)
    grew = {}
    for n in (1, 30_000):
        run = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(spec), str(n)], capture_output=True, text=True,
                             timeout=300, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        grew[n] = json.loads(run.stdout.strip().splitlines()[-1])["grew_kb"]
    assert grew[30_000] - grew[1] < 50 * 1024, grew


@pytest.mark.parametrize(
    "row, bad",
    [([0.0, float("inf")], True), ([float("-inf"), float("inf")], True), ([float("nan"), 1.0], True),
     ([3e38, 3e38], False), ([1.0, -2.0], False)],
    ids=["inf", "inf-minus-inf", "nan", "finite-sum-overflows", "finite"],
)
def test_the_finite_check_reads_the_sum_first_and_each_value_only_when_it_is_not_finite(row, bad):
    from vlmkit.generation.loop import _check_finite

    logits = torch.tensor([[0.5, 0.5], row])
    if not bad:  # a finite sum that overflowed float32 must not be mistaken for a bad value
        _check_finite(logits, 0)
        _check_finite(torch.full((1, 49280), 60000.0).half(), 0)  # float16: summed in float32
        return
    with pytest.raises(GenerationError, match=r"new token 2 \(batch rows \[1\]\)"):
        _check_finite(logits, 2)
