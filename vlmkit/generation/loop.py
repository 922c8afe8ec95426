"""The generic decode loop: :func:`generate_from_embeds` on any backbone with
``embed``/``forward``/``logits`` (and optionally ``new_cache``), and the streamer adapter.

The loop runs one forward over the prompt, then one forward per new token against a KV cache
and mask/position buffers that grow on demand (by at least ``GROW_STEP`` positions at a time), so
a step does no allocation beyond the backbone's own and memory follows the tokens made, not
``max_new_tokens``. All setup happens before the first token; the per-token body of
:func:`_decode_steps` is kept free of extra Python work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..decode_layout import ensure_decode_layout
from ..errors import GenerationError
from ..kv_cache import GROW_STEP, KVCache
from .defaults import context_length
from .options import check_ids, check_options, check_prompt, check_room, check_streamer, make_chooser, make_generator, Options


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
def _wider(buf: torch.Tensor, need: int, extend: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``buf`` ``(B, W, ...)`` widened along dim 1 to at least ``need`` columns (plus headroom, so
    widening is rare); ``extend(buf, n)`` makes the ``n`` new columns. ``buf`` when wide enough."""
    width = buf.shape[1]
    if width >= need:
        return buf
    return torch.cat([buf, extend(buf, max(need + GROW_STEP, width + width // 2) - width)], dim=1)


def _ones(buf: torch.Tensor, n: int) -> torch.Tensor:
    return buf.new_ones(buf.shape[0], n)


def _next_positions(buf: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` positions after each row's last one."""
    return buf[:, -1:] + torch.arange(1, n + 1, device=buf.device)


def _empty_rows(buf: torch.Tensor, n: int) -> torch.Tensor:
    return buf.new_empty(buf.shape[0], n, *buf.shape[2:])


def _check_finite(logits: torch.Tensor, step: int) -> None:
    """Stop with an error instead of emitting a token chosen from NaN/inf logits ``(B, V)``.

    Runs once per token, so it first reads one number: the float32 sum is finite when every
    logit is (~90 us after a decode step on an AMD EPYC, where the elementwise test took ~280 us);
    only a sum that is not finite (a NaN/inf, or finite logits whose sum overflowed) is checked
    value by value."""
    if math.isfinite(float(logits.float().sum())):
        return
    if not bool(torch.isfinite(logits).all()):
        rows = (~torch.isfinite(logits)).any(-1).nonzero().flatten().tolist()
        raise GenerationError(
            f"the model produced NaN or infinite logits at new token {step} (batch rows {rows}); "
            "no token was chosen from them",
            hint="check the weights for NaN/inf (vlmkit inspect --check, or build_from_hf(..., check_finite=True)); "
            "in float16 try bfloat16 or float32",
        )


class _Sequence:
    """One call's growing state: the KV cache (or, for a backbone without ``new_cache``, the
    embeddings so far ``(B, L, D)``), and for padded rows the attention mask and positions
    ``(B, L)``. Each grows on demand, by at least :data:`~vlmkit.kv_cache.GROW_STEP` columns, so a
    step allocates nothing and memory follows the tokens made, not ``max_new_tokens``."""

    def __init__(self, backbone: Any, embeds: torch.Tensor, mask: torch.Tensor | None, cache: Any, limit: int) -> None:
        B, T, _ = embeds.shape
        self.backbone, self.embed, self.prompt, self.length = backbone, backbone.embed, embeds, T
        new_cache = getattr(backbone, "new_cache", None)
        if cache is None and callable(new_cache):
            cache = new_cache(B, limit)
        self.cache = cache
        self.padded = mask is not None and not bool(mask.all())
        self.mask = mask if self.padded else None
        self.positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0) if self.padded else None
        self.embeds = embeds if cache is None else None

    def prefill(self) -> torch.Tensor:
        """One forward over the prompt; the ``(B, V)`` logits of its last position."""
        cache_kw = {} if self.cache is None else {"cache": self.cache}
        hidden = self.backbone(self.prompt, attention_mask=self.mask, position_ids=self.positions, **cache_kw)
        return self.backbone.logits(hidden[:, -1:])[:, -1]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed ``(B,)`` tokens; the ``(B, V)`` logits after them."""
        L = self.length = self.length + 1
        if self.padded:
            self.mask = _wider(self.mask, L, _ones)
            self.positions = _wider(self.positions, L, _next_positions)
        mask = self.mask[:, :L] if self.padded else None
        if self.cache is not None:
            pos = self.positions[:, L - 1 : L] if self.padded else None
            hidden = self.backbone(self.embed(tok[:, None]), attention_mask=mask, position_ids=pos, cache=self.cache)
        else:
            self.embeds = _wider(self.embeds, L, _empty_rows)
            self.embeds[:, L - 1] = self.embed(tok[:, None])[:, 0]
            pos = self.positions[:, :L] if self.padded else None
            hidden = self.backbone(self.embeds[:, :L], attention_mask=mask, position_ids=pos)
        return self.backbone.logits(hidden[:, -1:])[:, -1]


def _decode_steps(
    backbone: Any,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
    stops: torch.Tensor | None,
    pad_id: int,
    cache: Any = None,
) -> Iterator[torch.Tensor]:
    """Yield each step's ``(B,)`` next tokens. ``embeds``/``mask`` must be left-padded.

    One forward over the prompt (logits of the last position only), then one forward per new
    token with a KV cache (``cache``, else ``backbone.new_cache``) grown on demand; without
    ``new_cache`` the whole sequence is re-run each step.
    """
    B = embeds.shape[0]
    device = embeds.device
    past = cache.length if cache is not None else 0
    seq = _Sequence(backbone, embeds, mask, cache, past + embeds.shape[1] + max_new_tokens)
    logits = seq.prefill()
    unfinished = torch.ones(B, dtype=torch.bool, device=device) if stops is not None else None
    pad = torch.tensor(pad_id, dtype=torch.long, device=device)
    for step in range(max_new_tokens):  # the per-token path: keep it lean
        _check_finite(logits, step)
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
        logits = seq.step(tok)


# ============================================================================== generate_from_embeds
def _check_loop_args(
    backbone: Any, inputs_embeds: Any, attention_mask: Any, opts_args: tuple, eos_token_id: Any, pad_token_id: Any,
    streamer: Any, cache: Any,
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
    past = _check_cache(cache, B, attention_mask)
    check_room(past + T, opts.max_new_tokens, context_length(backbone))
    vocab = getattr(backbone, "vocab_size", None)
    stops = check_ids("eos_token_id", eos_token_id, vocab, many=True) or []
    pad = check_ids("pad_token_id", pad_token_id, vocab, many=False)
    pad = pad if pad is not None else (stops[0] if stops else 0)
    check_streamer(streamer)
    return opts, stops, pad


def _check_cache(cache: Any, batch: int, attention_mask: torch.Tensor | None) -> int:
    """The positions ``cache`` already holds (0 without one); a cache to continue must be for
    ``batch`` rows, and continued rows cannot be padded."""
    if cache is None:
        return 0
    if not isinstance(cache, KVCache):
        raise GenerationError(
            f"cache must be a vlmkit KVCache (backbone.new_cache(...)); got {type(cache).__name__}",
            hint="pass cache=None to start from an empty cache",
        )
    if cache.batch_size != batch:
        raise GenerationError(f"the cache holds {cache.batch_size} rows but inputs_embeds has {batch}")
    if cache.length and attention_mask is not None and not bool(attention_mask.all()):
        raise GenerationError(
            "continuing a filled cache needs unpadded rows (attention_mask all ones)",
            hint="continue one conversation per cache, or pass attention_mask=None",
        )
    return cache.length


def run_loop(
    backbone: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, opts: Options, *,
    generator: torch.Generator | None, stops: list[int], pad: int, streamer: Any, cache: Any = None,
) -> torch.Tensor:  # fmt: skip
    """The loop on arguments already checked (by :func:`generate_from_embeds` or
    :func:`~vlmkit.generation.generate`): runs :func:`_decode_steps` under ``inference_mode``,
    streaming each step; returns the ``(B, T_new)`` new tokens. The backbone's decode layout
    (:func:`~vlmkit.decode_layout.ensure_decode_layout`) is prepared on the first call."""
    ensure_decode_layout(backbone)
    with torch.inference_mode():
        return _collect(backbone, inputs_embeds, attention_mask, opts, generator, stops, pad, streamer, cache)


def _collect(
    backbone: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, opts: Options,
    generator: torch.Generator | None, stops: list[int], pad: int, streamer: Any, cache: Any,
) -> torch.Tensor:  # fmt: skip
    """Run :func:`_decode_steps`, streaming each step; returns the ``(B, T_new)`` steps run."""
    B = inputs_embeds.shape[0]
    device = inputs_embeds.device
    embeds, mask = left_aligned(inputs_embeds, attention_mask)
    stop_t = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
    if streamer is not None:
        streamer.put(torch.zeros(B, 0, dtype=torch.long))
    steps = []
    chooser = make_chooser(opts, generator)
    for tok in _decode_steps(backbone, embeds, mask, opts.max_new_tokens, chooser, stop_t, pad, cache):
        steps.append(tok)
        if streamer is not None:
            streamer.put(tok)
    if streamer is not None:
        streamer.end()
    return torch.stack(steps, dim=1)


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
    cache: KVCache | None = None,
) -> torch.LongTensor:
    """The generic decode loop on any backbone with ``embed``/``forward``/``logits`` (and
    optionally ``new_cache``). Returns only the new tokens, ``(B, T_new)``.

    ``eos_token_id`` None means no stop tokens (the caller resolves defaults). ``pad_token_id``
    fills rows after they stop (default: the first stop id, else 0). ``generator`` (or ``seed``)
    drives sampling. ``streamer`` follows transformers' protocol: ``put`` gets an empty ``(B, 0)``
    prompt first (as transformers' generate with ``inputs_embeds``), then each step's tokens; a
    plain callable gets each step's tokens as a list.

    ``cache`` continues a conversation: a :class:`~vlmkit.kv_cache.KVCache` that already holds
    the keys/values of the tokens before ``inputs_embeds`` (``inputs_embeds`` is then only the
    new part). On return it holds those, ``inputs_embeds`` and every new token but the last
    (which was never fed back); :attr:`KVCache.length` says how many. The prompt (cached part
    included) plus ``max_new_tokens`` must fit the backbone's context (``max_position_embeddings``).
    """
    opts, stops, pad = _check_loop_args(
        backbone, inputs_embeds, attention_mask, (max_new_tokens, do_sample, temperature, top_k, top_p, seed),
        eos_token_id, pad_token_id, streamer, cache,
    )  # fmt: skip
    if generator is None and opts.do_sample:
        generator = make_generator(opts.seed, inputs_embeds.device)
    if streamer is not None and not callable(getattr(streamer, "put", None)):
        streamer = StreamAdapter(streamer, torch.zeros(inputs_embeds.shape[0], 0, dtype=torch.long))
    return run_loop(backbone, inputs_embeds, attention_mask, opts, generator=generator, stops=stops, pad=pad,
                    streamer=streamer, cache=cache)  # fmt: skip
