"""Text generation for :class:`~vlmkit.model.VLM`: greedy and sampled decoding, streaming.

``generate(model, input_ids, ...)`` returns a ``(B, T_prompt + T_new)`` LongTensor laid out as
transformers' ``generate(input_ids=...)`` returns it: the prompt as given, then the new tokens;
a row that stopped early is padded with ``pad_token_id``; ``T_new`` is the number of steps run
(``max_new_tokens``, or fewer when every row stopped).

**The fallback chain.** Images are encoded once and merged into the prompt embeddings by
``model.embed`` (the prefill); then the backbone is asked, in this order:

1. ``backbone.generate_from_embeds(inputs_embeds, attention_mask, **gen)`` when it has one
   (:class:`~vlmkit.components.llama.LlamaBackbone` does: it runs :func:`generate_from_embeds`,
   the fast loop below) -- path ``"generate_from_embeds"``;
2. ``backbone.generate(inputs_embeds=..., attention_mask=..., **gen)`` when its signature names
   ``inputs_embeds`` (or takes ``**kwargs``), transformers style: it returns only the new tokens
   and follows transformers' streamer protocol -- path ``"generate(inputs_embeds)"``;
3. ``backbone.generate(input_ids=..., attention_mask=..., **gen)`` when it has a ``generate``
   that takes no embeddings -- path ``"generate(input_ids)"``, *text only*. Without images this
   is exact. With images (``pixel_values`` given or placeholders in the prompt) the images
   cannot reach such a backbone: with ``allow_text_only=True`` (default) the image placeholder
   tokens are removed from the prompt (framing text tokens stay), a :class:`UserWarning` says
   the images were dropped, and the rest runs as text; with ``allow_text_only=False`` a
   :class:`~vlmkit.errors.GenerationError` is raised instead. Placeholders without
   ``pixel_values`` are a :class:`~vlmkit.errors.PackingError` on every path.
4. a backbone with none of these (only the protocol's ``embed``/``forward``/``logits``) runs the
   generic loop of :func:`generate_from_embeds` directly -- path ``"decode_loop"`` (with a
   preallocated cache when the backbone has ``new_cache``, else re-running the whole sequence
   each step).

Whichever path ran, the output has the same layout, and ``model.last_generation`` holds a
:class:`GenerationInfo` (path, prefill and decode seconds, new tokens, decode tokens/s), also
logged at INFO on the ``vlmkit.generation`` logger.

**Padding and positions.** Batches are expected left-padded (``attention_mask`` 0 on the left).
Position ids follow transformers (5.x) generation: ``attention_mask.cumsum(-1) - 1`` with
padding positions set to 0, and each new token at the previous position + 1 -- i.e. every row
counts positions from its first real token. A mask that is not left-padded (right padding, holes)
is left-aligned internally (real tokens keep their order; this gives the same result as left
padding would); the returned prompt part is still ``input_ids`` exactly as given.

**Stop tokens.** ``eos_token_id`` (an int or a list) if given, else :func:`default_stop_ids`:
the checkpoint's ``generation_config.json`` eos ids, the backbone's ``eos_token_id`` and the
tokenizer's ``<end_of_utterance>``. Each row stops on its own; generation ends when every row has
stopped. ``pad_token_id`` defaults to :func:`default_pad_id`.

**Streaming.** ``streamer`` is a callable ``fn(token_ids: list[int])`` called once per step with
each row's new token (rows that stopped get ``pad_token_id``), or an object with ``put(tensor)``
and ``end()`` -- transformers' ``TextStreamer`` protocol: ``put`` first receives the prompt ids,
then each step's ``(B,)`` tokens, then ``end()`` is called. :func:`stream` yields decoded text
chunks as they are generated.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import GenerationError, PackingError, VlmkitError

__all__ = [
    "generate",
    "generate_from_embeds",
    "stream",
    "default_stop_ids",
    "default_pad_id",
    "GenerationInfo",
    "PATH_EMBEDS",
    "PATH_BACKBONE_EMBEDS",
    "PATH_TEXT_ONLY",
    "PATH_DECODE_LOOP",
]

log = logging.getLogger(__name__)

#: Path names recorded in :attr:`GenerationInfo.path`, in fallback order.
PATH_EMBEDS = "generate_from_embeds"
PATH_BACKBONE_EMBEDS = "generate(inputs_embeds)"
PATH_TEXT_ONLY = "generate(input_ids)"
PATH_DECODE_LOOP = "decode_loop"

#: The chat-turn terminator of Idefics3/SmolVLM tokenizers.
END_OF_UTTERANCE = "<end_of_utterance>"


@dataclass(frozen=True)
class GenerationInfo:
    """What the last :func:`generate` call did.

    ``prefill_s``: seconds from the call to the first new token (image encoding and prompt
    included); ``decode_s``: seconds from the first to the last new token; ``new_tokens``: steps
    run (``T_new``); ``tokens_per_s``: decode speed per row, ``(new_tokens - 1) / decode_s``
    (0.0 when there was a single step). ``images_dropped`` is True when the text-only path ran
    without the images.
    """

    path: str
    prefill_s: float
    decode_s: float
    new_tokens: int
    tokens_per_s: float
    batch_size: int = 1
    prompt_tokens: int = 0
    images_dropped: bool = False

    def summary(self) -> str:
        """One line, e.g. for a CLI."""
        dropped = ", images dropped" if self.images_dropped else ""
        return (
            f"path={self.path}{dropped} prefill={self.prefill_s:.3f}s decode={self.decode_s:.3f}s "
            f"new_tokens={self.new_tokens} ({self.tokens_per_s:.1f} tok/s)"
        )


# ============================================================================== defaults
def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


@functools.lru_cache(maxsize=32)
def _folder_facts(folder: str) -> tuple[tuple[int, ...], int | None, int | None]:
    """``(generation_config eos ids, generation_config pad id, <end_of_utterance> id)`` of a folder."""
    path = Path(folder)
    eos: list[int] = []
    pad = None
    try:
        gen = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
        if isinstance(gen, dict):
            eos = _as_id_list(gen.get("eos_token_id"))
            pad = gen.get("pad_token_id") if isinstance(gen.get("pad_token_id"), int) else None
    except (OSError, ValueError):
        pass
    eou = None
    try:
        tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        for entry in tok.get("added_tokens", []) if isinstance(tok, dict) else []:
            if isinstance(entry, dict) and entry.get("content") == END_OF_UTTERANCE and isinstance(entry.get("id"), int):
                eou = entry["id"]
                break
    except (OSError, ValueError):
        pass
    return tuple(eos), pad, eou


def _tokenizer_folder(model: Any) -> str | None:
    spec = getattr(model, "spec", None)
    source = getattr(spec, "tokenizer", None) or (spec.weights if isinstance(getattr(spec, "weights", None), str) else None)
    return _resolve_folder(str(source)) if source else None


@functools.lru_cache(maxsize=32)
def _resolve_folder(source: str) -> str | None:
    try:
        from .hf import resolve_config_folder

        folder, _ = resolve_config_folder(source)
    except (VlmkitError, OSError, ImportError):
        return None
    return str(folder)


def _backbone_setting(backbone: Any, key: str) -> Any:
    params = getattr(backbone, "params", None)
    value = getattr(params, key, None)
    if value is None and isinstance(getattr(params, "config", None), dict):
        value = params.config.get(key)
    return value


def _in_vocab(ids: list[int], vocab: int | None) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i >= 0 and (vocab is None or i < vocab) and i not in out:
            out.append(i)
    return out


def default_stop_ids(model: Any) -> list[int]:
    """The ids that end a row by default, in this order, without repeats: the ``eos_token_id`` of
    the checkpoint's ``generation_config.json`` (folder of ``model.spec.tokenizer``), the
    backbone's ``eos_token_id`` param and the tokenizer's ``<end_of_utterance>``. Ids outside the
    vocabulary are left out; nothing is hard-coded."""
    folder = _tokenizer_folder(model)
    gen_eos, _, eou = _folder_facts(folder) if folder else ((), None, None)
    ids = [*gen_eos, *_as_id_list(_backbone_setting(model.backbone, "eos_token_id"))]
    if eou is not None:
        ids.append(eou)
    return _in_vocab(ids, getattr(model.backbone, "vocab_size", None))


def default_pad_id(model: Any, stop_ids: Sequence[int] | None = None) -> int:
    """The id that fills rows after they stop: ``generation_config.json``'s ``pad_token_id``, else
    the backbone's ``pad_token_id``, else the first stop id (as transformers), else 0."""
    folder = _tokenizer_folder(model)
    vocab = getattr(model.backbone, "vocab_size", None)
    candidates = [
        _folder_facts(folder)[1] if folder else None,
        _backbone_setting(model.backbone, "pad_token_id"),
        *(list(stop_ids) if stop_ids is not None else default_stop_ids(model))[:1],
    ]
    for c in candidates:
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c and (vocab is None or c < vocab):
            return c
    return 0


# ============================================================================== validation
@dataclass(frozen=True)
class _Options:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_options(
    max_new_tokens: Any, do_sample: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any
) -> _Options:
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
    return _Options(max_new_tokens, do_sample, float(temperature), top_k, None if top_p is None else float(top_p), seed)


def _check_ids(name: str, value: Any, vocab: int | None, *, many: bool) -> list[int] | int | None:
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


def _check_streamer(streamer: Any) -> None:
    if streamer is None or (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        return
    if callable(streamer):
        return
    raise GenerationError(
        f"streamer must be a callable fn(token_ids) or an object with put(tensor) and end(); got {type(streamer).__name__}"
    )


def _check_prompt(input_ids: Any, attention_mask: Any) -> None:
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
def _chooser(opts: _Options, generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
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


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


# ============================================================================== streaming
class _StreamAdapter:
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


# ============================================================================== the fast loop
def _left_order(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, T)`` gather indices that move padding to the left of each row (stable: real tokens
    keep their order), or None when the mask is already left-padded."""
    if mask is None or mask.shape[1] < 2 or bool((mask[:, 1:] >= mask[:, :-1]).all()):
        return None
    return torch.sort(mask.to(torch.int8), dim=1, stable=True).indices


def _left_aligned(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` ``(B, T, ...)`` and its mask with the padding moved to the left."""
    order = _left_order(mask)
    if order is None:
        return x, mask
    index = order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index), mask.gather(1, order)


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
    total = T + max_new_tokens
    padded = mask is not None and not bool(mask.all())
    new_cache = getattr(backbone, "new_cache", None)
    cache = new_cache(B, total) if callable(new_cache) else None
    mbuf = pbuf = ebuf = None
    if padded:
        mbuf = torch.ones(B, total, dtype=mask.dtype, device=device)
        mbuf[:, :T] = mask
        pbuf = torch.empty(B, total, dtype=torch.long, device=device)
        pbuf[:, :T] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        pbuf[:, T:] = mask.long().sum(-1, keepdim=True) + torch.arange(max_new_tokens, device=device)
    if cache is None:
        ebuf = embeds.new_empty(B, total, embeds.shape[-1])
        ebuf[:, :T] = embeds
    cache_kw = {} if cache is None else {"cache": cache}
    hidden = backbone(
        embeds,
        attention_mask=mbuf[:, :T] if padded else None,
        position_ids=pbuf[:, :T] if padded else None,
        **cache_kw,
    )
    logits = backbone.logits(hidden[:, -1:])[:, -1]
    unfinished = torch.ones(B, dtype=torch.bool, device=device) if stops is not None else None
    pad = torch.tensor(pad_id, dtype=torch.long, device=device)
    embed = backbone.embed
    for step in range(max_new_tokens):
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
    opts = _check_options(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[1] < 1:
        raise GenerationError(
            f"inputs_embeds must be a (batch, length >= 1, hidden) tensor; got "
            f"{tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__}"
        )
    B, T = inputs_embeds.shape[:2]
    if attention_mask is not None:
        _check_prompt(torch.zeros(B, T, dtype=torch.long), attention_mask)
    vocab = getattr(backbone, "vocab_size", None)
    stops = _check_ids("eos_token_id", eos_token_id, vocab, many=True) or []
    pad = _check_ids("pad_token_id", pad_token_id, vocab, many=False)
    pad = pad if pad is not None else (stops[0] if stops else 0)
    _check_streamer(streamer)
    device = inputs_embeds.device
    if generator is None and opts.do_sample:
        generator = _generator(opts.seed, device)
    if streamer is not None and not callable(getattr(streamer, "put", None)):
        streamer = _StreamAdapter(streamer, torch.zeros(B, 0, dtype=torch.long))
    with torch.inference_mode():
        embeds, mask = _left_aligned(inputs_embeds, attention_mask)
        stop_t = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
        out = torch.full((B, opts.max_new_tokens), pad, dtype=torch.long, device=device)
        if streamer is not None:
            streamer.put(torch.zeros(B, 0, dtype=torch.long))
        n = 0
        for tok in _decode_steps(backbone, embeds, mask, opts.max_new_tokens, _chooser(opts, generator), stop_t, pad):
            out[:, n] = tok
            n += 1
            if streamer is not None:
                streamer.put(tok)
        if streamer is not None:
            streamer.end()
        return out[:, :n]


# ============================================================================== the chain
def _path(backbone: Any) -> str:
    if callable(getattr(backbone, "generate_from_embeds", None)):
        return PATH_EMBEDS
    gen = getattr(backbone, "generate", None)
    if callable(gen):
        try:
            params = inspect.signature(gen).parameters
        except (TypeError, ValueError):
            return PATH_BACKBONE_EMBEDS
        if "inputs_embeds" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return PATH_BACKBONE_EMBEDS
        return PATH_TEXT_ONLY
    return PATH_DECODE_LOOP


def _strip_placeholders(
    input_ids: torch.Tensor, mask: torch.Tensor, image_token_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the image placeholder ids, re-left-padding the rows."""
    keep = (input_ids != image_token_id) & mask.bool()
    rows = [input_ids[b][keep[b]] for b in range(input_ids.shape[0])]
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    new_mask = torch.zeros(len(rows), width, dtype=mask.dtype, device=mask.device)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, width - len(r) :] = r
            new_mask[b, width - len(r) :] = 1
    return ids, new_mask


def _hf_kwargs(opts: _Options, stops: list[int], pad: int, streamer: Any) -> dict[str, Any]:
    """Keyword arguments for a transformers-style ``generate``: every knob explicit, so the
    backbone's own generation defaults (e.g. top_k=50) never leak in."""
    kw: dict[str, Any] = {
        "max_new_tokens": opts.max_new_tokens,
        "do_sample": opts.do_sample,
        "eos_token_id": list(stops) if stops else None,
        "pad_token_id": pad,
        "streamer": streamer,
    }
    if opts.do_sample:
        kw.update(temperature=opts.temperature, top_k=opts.top_k or 0, top_p=1.0 if opts.top_p is None else opts.top_p)
    return kw


def _new_tokens(out: Any, prompt: torch.Tensor, max_new_tokens: int, path: str) -> torch.Tensor:
    """Normalise a backbone's output to the new tokens ``(B, T_new)``: a ``sequences`` attribute
    is unwrapped, and an output longer than ``max_new_tokens`` that starts with the prompt loses it."""
    if not isinstance(out, torch.Tensor):
        out = getattr(out, "sequences", out)
    if not isinstance(out, torch.Tensor) or out.is_floating_point():
        raise GenerationError(f"the backbone's {path} returned {type(out).__name__}, not a tensor of token ids")
    if out.dim() == 1:
        out = out[None]
    B, T = prompt.shape
    if out.shape[0] != B:
        raise GenerationError(f"the backbone's {path} returned {out.shape[0]} rows for a batch of {B}")
    starts_with_prompt = out.shape[1] >= T and torch.equal(out[:, :T].to(prompt.device), prompt)
    if starts_with_prompt and out.shape[1] > max_new_tokens:
        out = out[:, T:]
    if out.shape[1] > max_new_tokens:
        raise GenerationError(
            f"the backbone's {path} returned {out.shape[1]} new tokens but max_new_tokens is {max_new_tokens}"
        )
    return out.to(torch.long)


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    seed: int | None = None,
    allow_text_only: bool = True,
) -> torch.LongTensor:
    """Generate up to ``max_new_tokens`` after each prompt row; see the module docstring.

    Args:
        model: a :class:`~vlmkit.model.VLM`.
        input_ids: ``(B, T)`` prompt ids (the processor's, with image placeholders expanded).
        attention_mask: optional ``(B, T)`` 0/1; 0 marks (left) padding.
        pixel_values, pixel_attention_mask: the processor's image tensors; encoded once.
        max_new_tokens: >= 1.
        do_sample: sample instead of greedy argmax; then ``temperature`` (> 0), ``top_k`` (>= 1
            or None) and ``top_p`` (in (0, 1] or None) shape the distribution (in that order).
        eos_token_id: stop id(s); default :func:`default_stop_ids`.
        pad_token_id: fills rows that stopped; default :func:`default_pad_id`.
        streamer: callable ``fn(list[int])`` per step, or a ``put``/``end`` object.
        seed: makes sampling reproducible (a private ``torch.Generator``; the global RNG is
            left untouched).
        allow_text_only: when the backbone takes no embeddings, drop the images with a warning
            (True) or raise :class:`~vlmkit.errors.GenerationError` (False).

    Returns:
        ``(B, T + T_new)`` LongTensor: ``input_ids`` then the new tokens.
    """
    backbone = model.backbone
    vocab = getattr(backbone, "vocab_size", None)
    opts = _check_options(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
    _check_prompt(input_ids, attention_mask)
    stops = _check_ids("eos_token_id", eos_token_id, vocab, many=True)
    stops = default_stop_ids(model) if stops is None else stops
    pad = _check_ids("pad_token_id", pad_token_id, vocab, many=False)
    pad = default_pad_id(model, stops) if pad is None else pad
    _check_streamer(streamer)
    if not isinstance(allow_text_only, bool):
        raise GenerationError(f"allow_text_only must be True or False; got {allow_text_only!r}")
    with torch.inference_mode():
        return _run(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, opts, stops, pad, streamer, allow_text_only)


def _run(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, opts, stops, pad, streamer, allow_text_only):  # noqa: ANN001, PLR0913
    backbone = model.backbone
    device = model.device
    started = time.perf_counter()
    input_ids = input_ids.to(device=device, dtype=torch.long)
    mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    if pixel_attention_mask is not None:
        pixel_attention_mask = pixel_attention_mask.to(device)
    B, T = input_ids.shape
    path = _path(backbone)
    adapter = _StreamAdapter(streamer, input_ids)
    dropped = False
    if path == PATH_TEXT_ONLY:
        out, dropped = _text_only(model, input_ids, mask, pixel_values, opts, stops, pad, adapter, allow_text_only)
        new = _new_tokens(out, input_ids, opts.max_new_tokens, path)
    else:
        embeds = model.embed(input_ids, pixel_values, pixel_attention_mask)
        embeds, emask = _left_aligned(embeds, mask)
        if path == PATH_BACKBONE_EMBEDS:
            out = _with_seed(opts.seed, device, lambda: backbone.generate(
                inputs_embeds=embeds, attention_mask=emask, **_hf_kwargs(opts, stops, pad, adapter)
            ))
            new = _new_tokens(out, input_ids, opts.max_new_tokens, path)
        else:
            gen = dict(
                max_new_tokens=opts.max_new_tokens, do_sample=opts.do_sample, temperature=opts.temperature,
                top_k=opts.top_k, top_p=opts.top_p, eos_token_id=list(stops) or None, pad_token_id=pad,
                streamer=adapter, generator=_generator(opts.seed, device) if opts.do_sample else None,
            )
            fn = backbone.generate_from_embeds if path == PATH_EMBEDS else functools.partial(generate_from_embeds, backbone)
            new = _new_tokens(fn(embeds, emask, **gen), input_ids, opts.max_new_tokens, path)
    if adapter.steps == 0 and new.shape[1]:  # a backbone that did not stream: deliver afterwards
        adapter.prompt_seen = True
        for column in new.unbind(1):
            adapter.put(column)
    adapter.end()
    finished = time.perf_counter()
    first = adapter.first_token_at or finished
    n_new = int(new.shape[1])
    decode_s = max(finished - first, 0.0)
    info = GenerationInfo(
        path=path,
        prefill_s=first - started,
        decode_s=decode_s,
        new_tokens=n_new,
        tokens_per_s=(n_new - 1) / decode_s if n_new > 1 and decode_s > 0 else 0.0,
        batch_size=B,
        prompt_tokens=T,
        images_dropped=dropped,
    )
    try:
        model.last_generation = info
    except (AttributeError, TypeError):  # a frozen or slotted model object
        pass
    log.info("generation: %s", info.summary())
    return torch.cat([input_ids, new.to(device=device, dtype=torch.long)], dim=1)


def _with_seed(seed: int | None, device: torch.device, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with the global RNG seeded (restored afterwards) -- for backbones that sample
    with the global RNG (transformers' generate)."""
    if seed is None:
        return fn()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return fn()


def _text_only(model, input_ids, mask, pixel_values, opts, stops, pad, adapter, allow_text_only):  # noqa: ANN001, PLR0913
    """Path 3: a backbone whose ``generate`` takes only ``input_ids``. Returns (output, dropped)."""
    backbone = model.backbone
    packer = getattr(model, "packer", None)
    image_id = getattr(packer, "image_token_id", None)
    has_placeholders = image_id is not None and bool((input_ids == image_id).any())
    if has_placeholders and pixel_values is None:
        raise PackingError(
            f"input_ids hold image placeholders (id {image_id}) but no pixel_values were given",
            hint="pass the processor's pixel_values, or remove the <image> tokens",
        )
    dropped = pixel_values is not None or has_placeholders
    ids = input_ids
    text_mask = mask if mask is not None else torch.ones_like(input_ids)
    if dropped:
        name = type(backbone).__name__
        if not allow_text_only:
            raise GenerationError(
                f"backbone {name} takes no input embeddings (no generate_from_embeds, and its generate() "
                "does not accept inputs_embeds), so the images cannot reach it; allow_text_only=False forbids dropping them",
                hint="use a backbone that accepts inputs_embeds, or pass allow_text_only=True to generate from the text alone",
            )
        warnings.warn(
            f"backbone {name} takes no input embeddings: the images were dropped and generation runs on the text "
            f"only ({int((input_ids == image_id).sum()) if image_id is not None else 0} image placeholder tokens removed "
            "from the prompt); pass allow_text_only=False to make this an error",
            UserWarning,
            stacklevel=4,
        )
        if has_placeholders:
            ids, text_mask = _strip_placeholders(input_ids, text_mask, image_id, pad)
    ids, text_mask = _left_aligned(ids, text_mask)
    # The text-only backbone returns the prompt + new tokens (transformers' input_ids layout).
    out = _with_seed(opts.seed, model.device, lambda: backbone.generate(
        input_ids=ids, attention_mask=text_mask, **_hf_kwargs(opts, stops, pad, adapter)
    ))
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
        out = out[:, ids.shape[1] :]
    return out, dropped


# ============================================================================== stream
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
    _check_prompt(input_ids, kwargs.get("attention_mask"))
    if input_ids.shape[0] != 1:
        raise GenerationError(
            f"stream() takes one prompt row; got a batch of {input_ids.shape[0]}", hint="use generate() for batches"
        )
    _check_options(
        kwargs.get("max_new_tokens", 20), kwargs.get("do_sample", False), kwargs.get("temperature", 1.0),
        kwargs.get("top_k"), kwargs.get("top_p"), kwargs.get("seed"),
    )
    vocab = getattr(model.backbone, "vocab_size", None)
    stops = _check_ids("eos_token_id", kwargs.get("eos_token_id"), vocab, many=True)
    stops = default_stop_ids(model) if stops is None else stops
    kwargs["eos_token_id"] = stops
    if processor is None:
        from .processor import load_processor

        source = getattr(model.spec, "tokenizer", None)
        if not source:
            raise GenerationError("stream() needs a processor to decode, and model.spec.tokenizer is not set",
                                  hint="pass processor=vlmkit.processor.load_processor(folder)")
        processor = load_processor(source)
    return _stream_text(model, input_ids, processor, set(stops), skip_special_tokens, kwargs)


def _stream_text(model, input_ids, processor, stops, skip_special_tokens, kwargs) -> Iterator[str]:  # noqa: ANN001
    items: queue.Queue = queue.Queue()
    cancel = threading.Event()
    done = object()

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
    tokens: list[int] = []
    shown = 0
    try:
        while True:
            item = items.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            if item in stops:
                continue
            tokens.append(item)
            text = processor.decode(tokens, skip_special_tokens=skip_special_tokens)
            if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for more
                continue
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)
        if tokens:
            text = processor.decode(tokens, skip_special_tokens=skip_special_tokens)
            if len(text) > shown:
                yield text[shown:]
    finally:
        cancel.set()
        thread.join()
