"""Argument checks, the token chooser (greedy or sampled) and seeded randomness.

Every public entry point validates its arguments here first, so a bad value fails with a
:class:`~vlmkit.errors.GenerationError` that names the value and the valid range before any
model work starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GenerationError


@dataclass(frozen=True)
class Options:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ============================================================================== validation
def check_options(
    max_new_tokens: Any, do_sample: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any
) -> Options:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(
            f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}", hint="e.g. max_new_tokens=64"
        )
    if not isinstance(do_sample, bool):
        raise GenerationError(f"do_sample must be True or False; got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise GenerationError(f"temperature must be a finite number > 0; got {temperature!r}")
    if do_sample and temperature <= 0:
        raise GenerationError(
            f"temperature must be > 0 when sampling (valid range: (0, inf)); got {temperature!r}",
            hint="use do_sample=False for greedy decoding",
        )
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise GenerationError(f"top_k must be None or an integer >= 1; got {top_k!r}", hint="None keeps every token")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1 or math.isnan(top_p)
    ):
        raise GenerationError(f"top_p must be None or in the range (0, 1]; got {top_p!r}", hint="1.0 keeps every token")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise GenerationError(f"seed must be None or an integer >= 0; got {seed!r}")
    return Options(max_new_tokens, do_sample, float(temperature), top_k, None if top_p is None else float(top_p), seed)


def check_room(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """Refuse, before anything is allocated, a prompt of ``prompt_tokens`` (cached tokens included)
    that cannot take ``max_new_tokens`` more within the backbone's ``context`` (None: no bound)."""
    if context is None or prompt_tokens + max_new_tokens <= context:
        return
    room = context - prompt_tokens
    if room < 1:
        raise GenerationError(
            f"the prompt is {prompt_tokens} tokens, which fills the model's context of {context} tokens "
            "(max_position_embeddings) with no room for an answer",
            hint="shorten the prompt: fewer or smaller images (do_image_splitting=False, a smaller longest_edge) or less text",
        )
    raise GenerationError(
        f"the prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {prompt_tokens + max_new_tokens} "
        f"tokens exceeds the model's context of {context} tokens (max_position_embeddings)",
        hint=f"ask for max_new_tokens <= {room}, or shorten the prompt",
    )


def check_ids(name: str, value: Any, vocab: int | None, *, many: bool) -> list[int] | int | None:
    if value is None:
        return None
    items = list(value) if many and isinstance(value, (list, tuple)) else [value]
    if isinstance(value, torch.Tensor):
        items = value.reshape(-1).tolist()
    for v in items:
        if not _is_int(v) or v < 0 or (vocab is not None and v >= vocab):
            rng = f"[0, {vocab})" if vocab is not None else ">= 0"
            raise GenerationError(f"{name} must be {'an id or a list of ids' if many else 'an id'} in {rng}; got {value!r}")
    return items if many else items[0]


def check_streamer(streamer: Any) -> None:
    if streamer is None or (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        return
    if callable(streamer):
        return
    raise GenerationError(
        f"streamer must be a callable fn(token_ids) or an object with put(tensor) and end(); got {type(streamer).__name__}"
    )


def check_prompt(input_ids: Any, attention_mask: Any) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise GenerationError(f"input_ids must be a (batch, length) integer tensor; got {shape}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise GenerationError(f"input_ids must hold at least one token per row; got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise GenerationError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; got {shape}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise GenerationError("attention_mask must hold only 0 (padding) and 1 (token)")
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise GenerationError(f"attention_mask rows {empty} are all padding; every row needs at least one token")


# ============================================================================== sampling
def make_chooser(opts: Options, generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(B, V)`` logits -> ``(B,)`` next tokens (transformers' warper order: temperature, top-k, top-p)."""
    if not opts.do_sample:
        return lambda logits: logits.argmax(-1)
    temperature, top_k, top_p = opts.temperature, opts.top_k, opts.top_p

    def choose(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        if temperature != 1.0:
            scores = scores / temperature
        if top_k is not None and top_k < scores.shape[-1]:
            kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if top_p is not None and top_p < 1.0:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
            drop_sorted = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
            drop_sorted[..., -1:] = False  # always keep the most likely token
            scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)

    return choose


# ============================================================================== seeds
def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def with_seed(seed: int | None, device: torch.device, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with the global RNG seeded (restored afterwards) -- for backbones that sample
    with the global RNG (transformers' generate)."""
    if seed is None:
        return fn()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return fn()
