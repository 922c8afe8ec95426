"""The generic decode loop: :func:`generate_from_embeds` on any backbone with
``embed``/``forward``/``logits`` (and optionally ``new_cache``), and the streamer adapter.

The loop runs one forward over the prompt, then one forward per new token against a
preallocated KV cache and preallocated mask/position buffers, so a step does no allocation
beyond the backbone's own. All setup happens before the first token; the per-token body of
:func:`_decode_steps` is kept free of extra Python work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..errors import GenerationError
from .options import check_ids, check_options, check_prompt, check_streamer, make_chooser, make_generator, Options


# ============================================================================== streaming
class StreamAdapter:
    """The ``put``/``end`` object every path gets: notes when the first new token arrives and
    forwards to the user's streamer (callable or put/end). The first ``put`` is the prompt
    (transformers' protocol); the user's put/end streamer gets the real prompt ids there."""

    __slots__ = ("user", "is_callable", "prompt", "prompt_seen", "first_token_at", "steps", "ended")

    def __init__(self, user: Any, prompt: torch.Tensor) -> None:
        self.user = user
        self.is_callable = user is not None and not callable(getattr(user, "put", None))
        self.prompt = prompt
        self.prompt_seen = False
        self.first_token_at: float | None = None
        self.steps = 0
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            if self.user is not None and not self.is_callable:
                self.user.put(self.prompt.cpu())
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.steps += 1
        if self.user is None:
            return
        if self.is_callable:
            self.user(value.reshape(-1).tolist())
        else:
            self.user.put(value.cpu())

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.user is not None and not self.is_callable:
            self.user.end()


# ============================================================================== padding
def _left_order(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, T)`` gather indices that move padding to the left of each row (stable: real tokens
    keep their order), or None when the mask is already left-padded."""
    if mask is None or mask.shape[1] < 2 or bool((mask[:, 1:] >= mask[:, :-1]).all()):
        return None
    return torch.sort(mask.to(torch.int8), dim=1, stable=True).indices


def left_aligned(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` ``(B, T, ...)`` and its mask with the padding moved to the left."""
    order = _left_order(mask)
    if order is None:
        return x, mask
    index = order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index), mask.gather(1, order)


# ============================================================================== the fast loop
def _mask_and_positions(mask: torch.Tensor, total: int, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Preallocated ``(B, total)`` attention mask and position ids for a left-padded prompt:
    positions count from each row's first real token (padding at 0), new tokens continue them."""
    B, T = mask.shape
    device = mask.device
    mbuf = torch.ones(B, total, dtype=mask.dtype, device=device)
    mbuf[:, :T] = mask
    pbuf = torch.empty(B, total, dtype=torch.long, device=device)
    pbuf[:, :T] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    pbuf[:, T:] = mask.long().sum(-1, keepdim=True) + torch.arange(max_new_tokens, device=device)
    return mbuf, pbuf


def _prefill_logits(
    backbone: Any, embeds: torch.Tensor, mbuf: torch.Tensor | None, pbuf: torch.Tensor | None, cache: Any
) -> torch.Tensor:
    """One forward over the prompt; the ``(B, V)`` logits of its last position."""
    T = embeds.shape[1]
    cache_kw = {} if cache is None else {"cache": cache}
    hidden = backbone(
        embeds,
        attention_mask=mbuf[:, :T] if mbuf is not None else None,
        position_ids=pbuf[:, :T] if pbuf is not None else None,
        **cache_kw,
    )
    return backbone.logits(hidden[:, -1:])[:, -1]


def _prepare(
    backbone: Any, embeds: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int
) -> tuple[Any, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Everything :func:`_decode_steps` allocates up front, and the prefill: ``(cache, mask
    buffer, position buffer, embeddings buffer, first logits)``. The mask/position buffers are
    None when no row is padded; the embeddings buffer is None when the backbone has a cache."""
    B, T, _ = embeds.shape
    total = T + max_new_tokens
    padded = mask is not None and not bool(mask.all())
    new_cache = getattr(backbone, "new_cache", None)
    cache = new_cache(B, total) if callable(new_cache) else None
    mbuf, pbuf = _mask_and_positions(mask, total, max_new_tokens) if padded else (None, None)
    ebuf = None
    if cache is None:  # no cache: each step re-runs the whole sequence from this buffer
        ebuf = embeds.new_empty(B, total, embeds.shape[-1])
        ebuf[:, :T] = embeds
    return cache, mbuf, pbuf, ebuf, _prefill_logits(backbone, embeds, mbuf, pbuf, cache)


def _decode_steps(
    backbone: Any,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
    stops: torch.Tensor | None,
    pad_id: int,
) -> Iterator[torch.Tensor]:
    """Yield each step's ``(B,)`` next tokens. ``embeds``/``mask`` must be left-padded.

    One forward over the prompt (logits of the last position only), then one forward per new
    token with a preallocated KV cache (``backbone.new_cache``) and preallocated mask/position
    buffers; without ``new_cache`` the whole sequence is re-run each step.
    """
    B, T, _ = embeds.shape
    device = embeds.device
    cache, mbuf, pbuf, ebuf, logits = _prepare(backbone, embeds, mask, max_new_tokens)
    padded = mbuf is not None
    unfinished = torch.ones(B, dtype=torch.bool, device=device) if stops is not None else None
    pad = torch.tensor(pad_id, dtype=torch.long, device=device)
    embed = backbone.embed
    for step in range(max_new_tokens):  # the per-token path: keep it lean
        tok = choose(logits)
        if unfinished is not None:
            tok = torch.where(unfinished, tok, pad)
        yield tok
        if unfinished is not None:
            unfinished &= ~torch.isin(tok, stops)
            if not bool(unfinished.any()):
                return
        if step + 1 == max_new_tokens:
            return
        L = T + step + 1
        if cache is not None:
            hidden = backbone(
                embed(tok[:, None]),
                attention_mask=mbuf[:, :L] if padded else None,
                position_ids=pbuf[:, L - 1 : L] if padded else None,
                cache=cache,
            )
        else:
            ebuf[:, L - 1] = embed(tok[:, None])[:, 0]
            hidden = backbone(
                ebuf[:, :L], attention_mask=mbuf[:, :L] if padded else None, position_ids=pbuf[:, :L] if padded else None
            )
        logits = backbone.logits(hidden[:, -1:])[:, -1]


# ============================================================================== generate_from_embeds
def _check_loop_args(
    backbone: Any, inputs_embeds: Any, attention_mask: Any, opts_args: tuple, eos_token_id: Any, pad_token_id: Any,
    streamer: Any,
) -> tuple[Options, list[int], int]:  # fmt: skip
    """Validate :func:`generate_from_embeds`' arguments; ``(options, stop ids, pad id)``."""
    opts = check_options(*opts_args)
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[1] < 1:
        raise GenerationError(
            f"inputs_embeds must be a (batch, length >= 1, hidden) tensor; got "
            f"{tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__}"
        )
    B, T = inputs_embeds.shape[:2]
    if attention_mask is not None:
        check_prompt(torch.zeros(B, T, dtype=torch.long), attention_mask)
    vocab = getattr(backbone, "vocab_size", None)
    stops = check_ids("eos_token_id", eos_token_id, vocab, many=True) or []
    pad = check_ids("pad_token_id", pad_token_id, vocab, many=False)
    pad = pad if pad is not None else (stops[0] if stops else 0)
    check_streamer(streamer)
    return opts, stops, pad


def _collect(
    backbone: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, opts: Options,
    generator: torch.Generator | None, stops: list[int], pad: int, streamer: Any,
) -> torch.Tensor:  # fmt: skip
    """Run :func:`_decode_steps` into a preallocated ``(B, max_new_tokens)`` output, streaming
    each step; returns the ``(B, T_new)`` steps run."""
    B = inputs_embeds.shape[0]
    device = inputs_embeds.device
    embeds, mask = left_aligned(inputs_embeds, attention_mask)
    stop_t = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
    out = torch.full((B, opts.max_new_tokens), pad, dtype=torch.long, device=device)
    if streamer is not None:
        streamer.put(torch.zeros(B, 0, dtype=torch.long))
    n = 0
    for tok in _decode_steps(backbone, embeds, mask, opts.max_new_tokens, make_chooser(opts, generator), stop_t, pad):
        out[:, n] = tok
        n += 1
        if streamer is not None:
            streamer.put(tok)
    if streamer is not None:
        streamer.end()
    return out[:, :n]


def generate_from_embeds(
    backbone: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.LongTensor:
    """The generic decode loop on any backbone with ``embed``/``forward``/``logits`` (and
    optionally ``new_cache``). Returns only the new tokens, ``(B, T_new)``.

    ``eos_token_id`` None means no stop tokens (the caller resolves defaults). ``pad_token_id``
    fills rows after they stop (default: the first stop id, else 0). ``generator`` (or ``seed``)
    drives sampling. ``streamer`` follows transformers' protocol: ``put`` gets an empty ``(B, 0)``
    prompt first (as transformers' generate with ``inputs_embeds``), then each step's tokens; a
    plain callable gets each step's tokens as a list.
    """
    opts, stops, pad = _check_loop_args(
        backbone, inputs_embeds, attention_mask, (max_new_tokens, do_sample, temperature, top_k, top_p, seed),
        eos_token_id, pad_token_id, streamer,
    )  # fmt: skip
    if generator is None and opts.do_sample:
        generator = make_generator(opts.seed, inputs_embeds.device)
    if streamer is not None and not callable(getattr(streamer, "put", None)):
        streamer = StreamAdapter(streamer, torch.zeros(inputs_embeds.shape[0], 0, dtype=torch.long))
    with torch.inference_mode():
        return _collect(backbone, inputs_embeds, attention_mask, opts, generator, stops, pad, streamer)
