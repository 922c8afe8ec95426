"""A multi-turn conversation that reuses the KV cache of everything already said.

:class:`ChatSession` keeps the messages, the images attached to each user turn and one
:class:`~vlmkit.kv_cache.KVCache` holding the keys/values of every token fed so far. A new turn
renders the whole conversation with the checkpoint's chat template, tokenizes it, finds the
longest prefix it shares with the tokens already in the cache (the earlier turns, their images
and answers) and runs the model only on the rest: a follow-up question about the same image costs
its own few tokens, not the image again. The answer is token-identical to generating from the
whole conversation from scratch (tested).

Backbones without a vlmkit ``KVCache`` (e.g. ``hf_causal_lm``) still chat: each turn then runs
the whole conversation (:attr:`TurnInfo.reused_tokens` is 0, and this is logged once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import GenerationError
from .generation import (
    IncrementalText,
    check_options,
    context_length,
    default_pad_id,
    default_stop_ids,
    generate,
    generate_from_embeds,
)
from .kv_cache import KVCache

__all__ = ["ChatSession", "TurnInfo"]

log = logging.getLogger("vlmkit.chat")


@dataclass(frozen=True)
class TurnInfo:
    """What one turn did: ``prompt_tokens`` in the rendered conversation, ``reused_tokens`` of them
    taken from the cache, ``new_tokens`` generated, ``first_token_s`` from the call to the first
    new token, ``total_s`` for the whole turn, ``interrupted`` when Ctrl-C stopped the answer."""

    prompt_tokens: int
    reused_tokens: int
    new_tokens: int
    first_token_s: float
    total_s: float
    interrupted: bool = False


class ChatSession:
    """History, images and the reused KV cache of one conversation; see the module docstring.

    ``gen`` are :func:`vlmkit.generation.generate`'s sampling options (``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``), checked here once;
    ``processor_options`` go to every processor call (e.g. ``{"do_image_splitting": False}``).
    """

    def __init__(self, model: Any, processor: Any, *, system: str | None = None,
                 processor_options: dict[str, Any] | None = None, **gen: Any) -> None:  # fmt: skip
        self.model, self.processor, self.system = model, processor, system
        self.processor_options = dict(processor_options or {})
        if callable(getattr(processor, "check_options", None)):  # a bad stored option fails here, not at turn 1
            processor.check_options(**self.processor_options)
        options = {"max_new_tokens": 256, "do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None, "seed": None}
        unknown = sorted(set(gen) - set(options))
        if unknown:
            raise GenerationError(f"ChatSession got unknown option(s) {unknown}", hint=f"valid: {sorted(options)}")
        options.update(gen)
        self.options = check_options(*options.values())
        self.stops = default_stop_ids(model)
        self.pad = default_pad_id(model, self.stops)
        self.last_turn: TurnInfo | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the cache storage is kept for the next one)."""
        self.messages: list[dict[str, Any]] = []
        self.images: list[Any] = []
        self._fed: list[int] = []  # the ids whose keys/values the cache holds, in order
        if getattr(self, "_cache", None) is not None:
            self._cache.reset()

    # ------------------------------------------------------------------ one turn
    def ask(self, text: str, images: Sequence[Any] = (), *, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn (``text`` after its ``images``), answer it and return the answer.

        ``on_text`` gets the answer's text as it grows. On Ctrl-C the partial answer is kept in
        the history (and in the cache) and ``KeyboardInterrupt`` is raised again.
        """
        if not isinstance(text, str):
            raise GenerationError(f"a chat turn is a string; got {type(text).__name__}")
        started = time.perf_counter()  # the clock includes rendering and preprocessing
        images = list(images)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        user = {"role": "user", "content": content}
        prompt = self.processor.apply_chat_template(self._history() + [user], add_generation_prompt=True)
        enc = self._tokenize(prompt, self.images + images)
        self.messages.append(user)
        self.images.extend(images)
        decoder = IncrementalText(self.processor, set(self.stops))
        try:
            new, reused, first_at = self._answer(enc, decoder, on_text)
        except KeyboardInterrupt:
            self._close_turn(decoder.text, enc["input_ids"].shape[1], 0, started, None, len(decoder.tokens), True)
            raise
        except BaseException:  # the turn did not happen: the history stays as it was
            self.messages.pop()
            del self.images[len(self.images) - len(images) :]
            raise
        answer = decoder.text
        self._close_turn(answer, enc["input_ids"].shape[1], reused, started, first_at, new, False)
        return answer

    def _tokenize(self, prompt: str, images: list[Any]) -> Any:
        """The conversation's ids; pixels are encoded later, only for images the cache lacks."""
        tokenize = getattr(self.processor, "tokenize", None)
        call = tokenize if callable(tokenize) else self.processor
        return call(text=prompt, images=images or None, **self.processor_options)

    def _history(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        return system + self.messages

    def _close_turn(self, answer: str, prompt: int, reused: int, started: float, first_at: float | None,
                    new: int, interrupted: bool) -> None:  # fmt: skip
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        now = time.perf_counter()
        self.last_turn = TurnInfo(prompt, reused, new, (first_at or now) - started, now - started, interrupted)

    def _answer(self, enc: Any, decoder: IncrementalText, on_text: Callable[[str], None] | None) -> tuple[int, int, float | None]:
        """Run the model on the new part of ``enc``; ``(new tokens, reused tokens, first token time)``."""
        first_at: list[float] = []
        got: list[int] = []

        def on_step(ids: list[int]) -> None:
            if not first_at:
                first_at.append(time.perf_counter())
            got.append(ids[0])
            chunk = decoder.push(ids[0])
            if chunk and on_text is not None:
                on_text(chunk)

        ids = enc["input_ids"][0].tolist()
        cache = self._kv_cache()
        if cache is None:
            self._generate_whole(enc, on_step)
            return len(got), 0, first_at[0] if first_at else None
        reused = self._reusable(ids, enc)
        cache.reset(reused)
        self._fed = ids[:reused]
        try:
            embeds = self._embed_suffix(ids, reused, enc)
            generate_from_embeds(self.model.backbone, embeds, cache=cache, streamer=on_step, eos_token_id=self.stops,
                                 pad_token_id=self.pad, **self._gen())  # fmt: skip
        finally:  # also on Ctrl-C: the cache holds exactly what was fed
            self._fed = (ids + got)[: cache.length]
        return len(got), reused, first_at[0] if first_at else None

    def _gen(self) -> dict[str, Any]:
        o = self.options
        return {"max_new_tokens": o.max_new_tokens, "do_sample": o.do_sample, "temperature": o.temperature,
                "top_k": o.top_k, "top_p": o.top_p, "seed": o.seed}  # fmt: skip

    def _generate_whole(self, enc: Any, on_step: Callable[[list[int]], None]) -> None:
        if "pixel_values" not in enc and self.images:
            enc = {**enc, **self._encode_images(self.images)}
        kwargs = {k: enc[k] for k in ("attention_mask", "pixel_values", "pixel_attention_mask") if k in enc}
        generate(self.model, enc["input_ids"], streamer=on_step, eos_token_id=self.stops, pad_token_id=self.pad,
                 **kwargs, **self._gen())  # fmt: skip

    # ------------------------------------------------------------------ the cache
    def _kv_cache(self) -> KVCache | None:
        """The conversation's cache (made on first use, up to the context), or None when the
        backbone has no vlmkit KVCache."""
        if getattr(self, "_cache", None) is not None:
            return self._cache
        new_cache = getattr(self.model.backbone, "new_cache", None)
        context = context_length(self.model.backbone)
        cache = new_cache(1, context) if callable(new_cache) and context is not None else None
        if not isinstance(cache, KVCache):
            log.info("%s has no vlmkit KVCache: each chat turn runs the whole conversation", type(self.model.backbone).__name__)
            cache = None
        self._cache = cache
        return cache

    def _reusable(self, ids: list[int], enc: Any) -> int:
        """How many leading ``ids`` the cache can keep: the prefix shared with what it holds,
        never cutting an image's tokens in two, and leaving at least one token to run."""
        n = 0
        for a, b in zip(ids, self._fed):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)
        image_id = self.processor.image_token_id
        spans = self._image_spans(ids, image_id)
        for start, end in spans:
            if start < n < end:
                return start
        return n

    @staticmethod
    def _image_spans(ids: list[int], image_id: int) -> list[tuple[int, int]]:
        """``(first, last + 1)`` positions of each maximal run of placeholder ids."""
        spans, start = [], None
        for i, t in enumerate([*ids, -1]):
            if t == image_id and start is None:
                start = i
            elif t != image_id and start is not None:
                spans.append((start, i))
                start = None
        return spans

    def _embed_suffix(self, ids: list[int], reused: int, enc: Any) -> torch.Tensor:
        """Input embeddings ``(1, T - reused, D)`` of the tokens after the reused prefix, with the
        images whose placeholders lie there: only those are encoded (the earlier ones are in the
        cache already; an image cut inside keeps its tiles from the cut on)."""
        device = self.model.device
        suffix = torch.tensor([ids[reused:]], dtype=torch.long, device=device)
        image_id = self.processor.image_token_id
        per_tile = self.processor.image_seq_len
        done_tiles = sum(1 for t in ids[:reused] if t == image_id) // per_tile
        if done_tiles * per_tile >= sum(1 for t in ids if t == image_id):
            return self.model.embed(suffix)
        first, skip = self._first_unfed_image(done_tiles)
        if "pixel_values" in enc:  # a processor without tokenize(): it encoded every image
            pixels, mask = enc["pixel_values"][:, done_tiles:], enc.get("pixel_attention_mask")
            mask = None if mask is None else mask[:, done_tiles:]
        else:
            encoded = self._encode_images(self.images[first:])
            pixels, mask = encoded["pixel_values"][:, skip:], encoded.get("pixel_attention_mask")
            mask = None if mask is None else mask[:, skip:]
        return self.model.embed(suffix, pixels.to(device), None if mask is None else mask.to(device))

    def _first_unfed_image(self, done_tiles: int) -> tuple[int, int]:
        """``(index of the first image not wholly in the cache, how many of its tiles are)``."""
        seen = 0
        for k, image in enumerate(self.images):
            tiles = self.processor.image_cost(image, **self.processor_options).n_tiles
            if seen + tiles > done_tiles:
                return k, done_tiles - seen
            seen += tiles
        return len(self.images), 0

    def _encode_images(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """``pixel_values`` ``(1, N, 3, H, W)`` and ``pixel_attention_mask`` of ``images``, as one prompt's."""
        enc = self.processor(images=[list(images)], **self.processor_options)
        return {k: enc[k] for k in ("pixel_values", "pixel_attention_mask") if k in enc}
