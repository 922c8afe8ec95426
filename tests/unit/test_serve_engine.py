"""The server's engine without HTTP: the slot cache, continuous batching against ``generate`` alone,
the one-at-a-time fallback, stop strings, image limits and option checks."""

from __future__ import annotations

import io
import queue
import random
import time

import pytest
import torch
from PIL import Image, ImageFile

import vlmkit
from vlmkit.errors import VlmkitError
from vlmkit.serve import cache as cache_module
from vlmkit.serve import check_options
from vlmkit.serve.cache import SlotCache
from vlmkit.serve.engine import Engine
from vlmkit.serve.errors import RequestError
from vlmkit.serve.images import ImageLimits, load_image
from vlmkit.serve.jobs import Failed, Finished, Job
from vlmkit.serve.sampling import Sampling
from vlmkit.serve.text import TextTracker

TEXT = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "eos_token_id": 2}  # fmt: skip
TINY = {
    "vision_tower": {"name": "navit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "connector": {"name": "idefics3", "scale_factor": 2},
    "packer": {"name": "image_packer", "image_token_id": 3},
    "backbone": {"name": "llama", **TEXT},
}  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = vlmkit.build(TINY, load_weights=False)
    with torch.no_grad():  # larger weights than the 0.02 init: clear argmax gaps, long non-stop runs
        for p in m.backbone.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return m


def _prompt(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, TEXT["vocab_size"], (1, length), generator=g)


def _job(ids: torch.Tensor, n: int, events: queue.Queue, sampling=None, seen=None, **kw) -> Job:
    def decode(tokens):
        if seen is not None:
            seen[:] = tokens
        return "".join(f"<{t}>" for t in tokens)

    return Job(f"j{id(ids)}", ids, None, None, n, sampling or Sampling(0.0), TextTracker(decode, kw.pop("stop", ())), events.put, **kw)


def _wait(events: queue.Queue):
    while True:
        event = events.get(timeout=60)
        if isinstance(event, (Finished, Failed)):
            return event


def _alone(model, ids: torch.Tensor, n: int, stops) -> list[int]:
    new = model.generate(ids, max_new_tokens=n)[0, ids.shape[1] :].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return new[:cut]


# ============================================================================== the slot cache
def test_slot_cache_rows_compute_what_they_compute_alone(model, monkeypatch):
    """Rows join at different times with different prompt lengths, the storage grows and compacts,
    middle rows leave: every row's hidden states equal its own one-row KVCache run."""
    monkeypatch.setattr(cache_module, "INITIAL_WIDTH", 8)
    bb = model.backbone
    slots = SlotCache(bb.new_cache(1, 1), max_batch=4, max_width=64)
    alone, rows = {}, []  # name -> (cache, last token); rows: names in slot order

    def join(name, length):
        emb = bb.embed(_prompt(length, seed=length))
        solo = bb.new_cache(1, 64)
        bb(emb, cache=solo)
        part = bb.new_cache(1, length)
        bb(emb, cache=part)
        slots.add(part)
        alone[name] = solo
        rows.append(name)

    def step(k):
        tokens = torch.tensor([[5 + k + i] for i in range(len(rows))])
        slots.reserve(1)
        mask, pos = slots.step_inputs()
        batched = bb(bb.embed(tokens), attention_mask=mask, position_ids=pos, cache=slots)
        for i, name in enumerate(rows):
            want = bb(bb.embed(tokens[i : i + 1]), cache=alone[name])
            torch.testing.assert_close(batched[i : i + 1], want, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        join("a", 5)
        for k in range(3):
            step(k)
        join("b", 11)  # longer than the running rows: they shift right
        join("c", 2)
        for k in range(6):
            step(k)
        moved = slots.remove(0)  # "a" leaves; the last row moves into its slot
        assert moved == 2
        rows[0] = rows.pop()
        for k in range(20):  # grows past 8, 16, 32 columns and compacts the shared padding
            step(k)
        join("d", 7)
        for k in range(5):
            step(k)
    assert slots.width > 8 and slots.rows == 3


# ============================================================================== the engine
def test_engine_batches_and_each_greedy_row_matches_generate_alone(model, monkeypatch):
    monkeypatch.setattr(cache_module, "INITIAL_WIDTH", 16)
    engine = Engine(model, max_batch=3, max_queue=50)
    try:
        rng = random.Random(0)
        jobs = []
        for k in range(9):
            ids, n = _prompt(rng.randint(1, 30), seed=k), rng.randint(1, 40)
            events, seen = queue.Queue(), []
            engine.submit(_job(ids, n, events, seen=seen))
            jobs.append((ids, n, events, seen))
            time.sleep(0.002 * rng.randint(0, 3))
        for ids, n, events, seen in jobs:
            event = _wait(events)
            assert isinstance(event, Finished) and event.completion_tokens <= n
            assert seen[: event.completion_tokens] == _alone(model, ids, n, engine.stop_ids)[: len(seen)]
        buckets = {s.labels["le"]: s.value for s in engine.metrics.batch_rows.collect()[0].samples if s.name.endswith("_bucket")}
        assert buckets["+Inf"] > buckets["1.0"], "no decode step ran more than one row"
    finally:
        engine.close()


@pytest.mark.slow  # imports transformers (~4 s when it is not loaded yet)
def test_engine_runs_alone_when_the_backbone_has_no_kv_cache():
    config = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "eos_token_id": 2}  # fmt: skip
    torch.manual_seed(1)
    m = vlmkit.build({**TINY, "backbone": {"name": "hf_causal_lm", "config": config}}, load_weights=False)
    engine = Engine(m, max_batch=8, max_queue=8)
    try:
        assert not engine.batching and engine.max_batch == 1 and "DynamicCache" in engine.batching_note
        ids, events, seen = _prompt(6, seed=3), queue.Queue(), []
        engine.submit(_job(ids, 7, events, seen=seen))
        event = _wait(events)
        assert isinstance(event, Finished) and seen == _alone(m, ids, 7, engine.stop_ids)[: len(seen)]
    finally:
        engine.close()


def test_queue_full_cancel_and_timeout(model):
    engine = Engine(model, max_batch=1, max_queue=1)
    try:
        slow, waiting = queue.Queue(), queue.Queue()
        engine.submit(_job(_prompt(4, 1), 4000, slow, timeout_s=0.2))  # its first stop token is ~0.5 s away: it times out
        deadline = time.monotonic() + 30
        while not engine.stats()["running"] and time.monotonic() < deadline:  # it holds the one slot
            time.sleep(0.001)
        queued = _job(_prompt(4, 2), 5, waiting)
        engine.submit(queued)
        with pytest.raises(RequestError) as full:
            engine.submit(_job(_prompt(4, 3), 5, queue.Queue()))
        assert full.value.status == 429 and full.value.headers["Retry-After"].isdigit()
        engine.cancel(queued)
        event = _wait(slow)
        assert isinstance(event, Failed) and event.error.status == 504 and "--request-timeout" in event.error.message
        deadline = time.monotonic() + 5
        while engine.stats()["running"] and time.monotonic() < deadline:  # the slot is freed after the step
            time.sleep(0.001)
        assert engine.stats() == {"running": 0, "queued": 0} and waiting.empty()
    finally:
        engine.close()


# ============================================================================== text, images, options
def test_text_tracker_holds_back_possible_stop_strings():
    pieces = ["Hel", "lo", " wor", "ld", "!", " END", " more"]
    tracker = TextTracker(lambda ids: "".join(pieces[: len(ids)]), stop=["world!", "END"])
    sent = [tracker.push(k) for k in range(4)]
    assert "".join(sent) == "Hello " and not tracker.stopped  # " wor" + "ld" could start "world!"
    assert tracker.push(4) == "" and tracker.stopped and tracker.text == "Hello "
    tracker = TextTracker(lambda ids: "ab\ufffd" if len(ids) < 2 else "abc", stop=())  # a split multi-byte character
    assert tracker.push(1) == "" and tracker.push(2) == "abc" and tracker.finish() == ""


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    import base64

    calls = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(self.size) or original(self))
    limits = ImageLimits(max_bytes=10**6, max_pixels=100 * 100)
    bomb = "data:image/png;base64," + base64.b64encode(_png((3000, 3000), "1")).decode()
    with pytest.raises(RequestError, match=r"3000x3000 = 9000000 pixels, over the limit of 10000"):
        load_image(bomb, "messages[0].content[0]", limits)
    assert calls == []  # refused from the header: no pixel was decoded
    ok = "data:image/png;base64," + base64.b64encode(_png((50, 40))).decode()
    assert load_image(ok, "x", limits).size == (50, 40) and calls == [(50, 40)]
    with pytest.raises(RequestError, match="over the limit of 20 bytes"):
        load_image(ok, "x", ImageLimits(max_bytes=20, max_pixels=10**6))


def test_options_are_checked_with_the_flag_name(tmp_path):
    with pytest.raises(VlmkitError, match=r"--max-batch: Input should be greater than or equal to 1; got 0"):
        check_options(max_batch=0)
    with pytest.raises(VlmkitError, match=r"--image-root: .* is not a folder"):
        check_options(image_root=tmp_path / "missing")
    with pytest.raises(VlmkitError, match="--request-timeout"):
        check_options(request_timeout=-1)
    assert check_options(image_root=tmp_path).image_root == tmp_path.resolve()


def test_serve_command_checks_options_before_loading(capsys):
    from vlmkit.cli import main

    assert main(["serve", "no/such-model", "--max-batch", "0"]) == 1
    assert "--max-batch" in capsys.readouterr().err
