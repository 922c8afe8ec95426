""":func:`stream`: generate for one prompt row in a background thread and yield decoded text.

The generation thread hands each new token through a queue; the consumer decodes the tokens so
far and yields the text that is new since the last chunk (holding back an unfinished multi-byte
character). Leaving the loop early sets a cancel flag that the thread's streamer checks at the
next step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import GenerationError
from .chain import generate
from .defaults import default_stop_ids
from .options import check_ids, check_options, check_prompt


class _Cancelled(Exception):
    """Raised inside the generation thread when the consumer stopped iterating."""


def stream(
    model: Any,
    input_ids: torch.Tensor,
    *,
    processor: Any = None,
    skip_special_tokens: bool = True,
    **kwargs: Any,
) -> Iterator[str]:
    """Generate for one prompt row and yield the decoded text as it grows, chunk by chunk.

    ``kwargs`` are :func:`generate`'s (``attention_mask``, ``pixel_values``, ``max_new_tokens``,
    ...; not ``streamer``). ``processor`` decodes (anything with ``decode(ids,
    skip_special_tokens=...)``); default: :func:`vlmkit.processor.load_processor` of
    ``model.spec.tokenizer``. Stop tokens are not part of the text. Generation runs in a
    background thread; breaking out of the loop stops it after the current step.
    ``model.last_generation`` is set once the iterator is exhausted.
    """
    if "streamer" in kwargs:
        raise GenerationError("stream() makes its own streamer; call generate() to pass one")
    check_prompt(input_ids, kwargs.get("attention_mask"))
    if input_ids.shape[0] != 1:
        raise GenerationError(
            f"stream() takes one prompt row; got a batch of {input_ids.shape[0]}", hint="use generate() for batches"
        )
    check_options(
        kwargs.get("max_new_tokens", 20), kwargs.get("do_sample", False), kwargs.get("temperature", 1.0),
        kwargs.get("top_k"), kwargs.get("top_p"), kwargs.get("seed"),
    )
    vocab = getattr(model.backbone, "vocab_size", None)
    stops = check_ids("eos_token_id", kwargs.get("eos_token_id"), vocab, many=True)
    stops = default_stop_ids(model) if stops is None else stops
    kwargs["eos_token_id"] = stops
    processor = _default_processor(model) if processor is None else processor
    return _stream_text(model, input_ids, processor, set(stops), skip_special_tokens, kwargs)


def _default_processor(model: Any) -> Any:
    """:func:`vlmkit.processor.load_processor` of ``model.spec.tokenizer``."""
    from ..processor import load_processor

    source = getattr(model.spec, "tokenizer", None)
    if not source:
        raise GenerationError("stream() needs a processor to decode, and model.spec.tokenizer is not set",
                              hint="pass processor=vlmkit.processor.load_processor(folder)")
    return load_processor(source)


def _stream_text(model, input_ids, processor, stops, skip_special_tokens, kwargs) -> Iterator[str]:  # noqa: ANN001
    items: queue.Queue = queue.Queue()
    cancel = threading.Event()
    done = object()
    thread = _start_worker(model, input_ids, kwargs, items, cancel, done)
    try:
        yield from _text_chunks(items, done, processor, stops, skip_special_tokens)
    finally:
        cancel.set()
        thread.join()


def _start_worker(model, input_ids, kwargs, items: queue.Queue, cancel: threading.Event, done: object) -> threading.Thread:  # noqa: ANN001
    """Start the generation thread: each step's token goes to ``items``, then ``done`` (or the
    exception it raised); a set ``cancel`` stops it at the next step."""

    def on_step(ids: list[int]) -> None:
        if cancel.is_set():
            raise _Cancelled
        items.put(ids[0])

    def work() -> None:
        try:
            generate(model, input_ids, streamer=on_step, **kwargs)
        except _Cancelled:
            pass
        except BaseException as exc:  # handed to the consumer
            items.put(exc)
            return
        items.put(done)

    thread = threading.Thread(target=work, name="vlmkit-generate", daemon=True)
    thread.start()
    return thread


class IncrementalText:
    """Decodes a growing list of token ids into text, handing out only what is new.

    ``push(token)`` returns the text the token added ("" while a multi-byte character is still
    unfinished); stop ids are left out. Used by :func:`stream` and :mod:`vlmkit.chat`.
    """

    def __init__(self, processor: Any, stops: set[int] | frozenset[int] = frozenset(), *, skip_special_tokens: bool = True):
        self.processor, self.stops, self.skip = processor, set(stops), skip_special_tokens
        self.tokens: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        if token in self.stops:
            return ""
        self.tokens.append(token)
        text = self.processor.decode(self.tokens, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for more
            return ""
        return self._new(text)

    def flush(self) -> str:
        """Whatever is left (an unfinished character at the very end)."""
        return self._new(self.processor.decode(self.tokens, skip_special_tokens=self.skip)) if self.tokens else ""

    @property
    def text(self) -> str:
        return self.processor.decode(self.tokens, skip_special_tokens=self.skip) if self.tokens else ""

    def _new(self, text: str) -> str:
        if len(text) <= self.shown:
            return ""
        chunk, self.shown = text[self.shown :], len(text)
        return chunk


def _text_chunks(items: queue.Queue, done: object, processor: Any, stops: set[int], skip_special_tokens: bool) -> Iterator[str]:
    """Consume ``items`` until ``done``, yielding the decoded text as it grows (stop tokens left
    out; an unfinished multi-byte character waits for the next token)."""
    text = IncrementalText(processor, stops, skip_special_tokens=skip_special_tokens)
    while True:
        item = items.get()
        if item is done:
            break
        if isinstance(item, BaseException):
            raise item
        chunk = text.push(item)
        if chunk:
            yield chunk
    chunk = text.flush()
    if chunk:
        yield chunk
