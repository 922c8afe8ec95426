"""vlmkit.chat.ChatSession: every turn's answer equals generating from the whole conversation
from scratch, while the cache keeps what earlier turns already fed (their images included).

A tiny random SmolVLM-256M-layout model with the published tokenizer and chat template.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.chat import ChatSession
from vlmkit.errors import GenerationError

from ..e2e._tiny_smolvlm import load_tiny

NEW = 12


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


def _image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _reference(model, processor, messages, images) -> str:
    """The answer generated from the whole conversation, no cache reuse."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    enc = processor(text=prompt, images=images or None)
    out = model.generate(**{k: v for k, v in enc.items()}, max_new_tokens=NEW)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    stops = set(ChatSession(model, processor).stops)
    return processor.decode([t for t in new if t not in stops], skip_special_tokens=True)


def _user(text, n_images=0):
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_follow_up_turns_reuse_the_cache_and_match_a_fresh_run(tiny):
    model, processor = tiny
    chat = ChatSession(model, processor, max_new_tokens=NEW)
    img, img2 = _image(0, (64, 128)), _image(1)  # a split image (tiles + global), then a single tile
    a1 = chat.ask("What is in this image?", [img])
    assert a1 == _reference(model, processor, [_user("What is in this image?", 1)], [img])
    first = chat.last_turn
    assert first.reused_tokens == 0 and first.prompt_tokens > 3 * processor.image_seq_len
    a2 = chat.ask("And the colours?")
    history = [_user("What is in this image?", 1), _assistant(a1), _user("And the colours?")]
    assert a2 == _reference(model, processor, history, [img])
    assert chat.last_turn.reused_tokens >= first.prompt_tokens  # the image and the first answer are kept
    a3 = chat.ask("Compare with this one.", [img2])  # a new image in a later turn
    history += [_assistant(a2), _user("Compare with this one.", 1)]
    assert a3 == _reference(model, processor, history, [img, img2])
    assert chat.last_turn.reused_tokens > first.prompt_tokens


def test_reset_starts_over_and_ctrl_c_keeps_the_partial_answer(tiny):
    model, processor = tiny
    chat = ChatSession(model, processor, max_new_tokens=NEW)
    img = _image(2)
    answer = chat.ask("Describe it.", [img])
    chat.reset()
    assert chat.messages == [] and chat.ask("Describe it.", [img]) == answer
    chunks = []

    def stop_after_two(chunk):
        chunks.append(chunk)
        if len(chunks) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.ask("Say more.", on_text=stop_after_two)
    assert chat.last_turn.interrupted and chat.messages[-1] == _assistant("".join(chunks))
    follow = chat.ask("Go on.")  # the conversation goes on from the partial answer
    history = [_user("Describe it.", 1), _assistant(answer), _user("Say more."), _assistant("".join(chunks)), _user("Go on.")]
    assert follow == _reference(model, processor, history, [img])


def test_a_refused_turn_leaves_the_history_as_it_was(tiny):
    model, processor = tiny
    chat = ChatSession(model, processor, max_new_tokens=NEW)
    chat.ask("Hello.")
    before = list(chat.messages)
    with pytest.raises(GenerationError, match="context"):
        chat.ask("x " * 5000)  # more than the tiny model's 4096-token context
    assert chat.messages == before
    with pytest.raises(GenerationError, match="unknown option"):
        ChatSession(model, processor, max_tokens=3)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        ChatSession(model, processor, max_new_tokens=0)


def test_processor_options_are_checked_when_the_session_is_made(tiny):
    from vlmkit.errors import ProcessorError

    model, processor = tiny
    with pytest.raises(ProcessorError, match="do_image_spliting.*did you mean 'do_image_splitting'"):
        ChatSession(model, processor, processor_options={"do_image_spliting": False})
    ChatSession(model, processor, processor_options={"do_image_splitting": False})  # a valid one is kept
