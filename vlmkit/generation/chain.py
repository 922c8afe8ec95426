""":func:`generate`: the fallback chain from the fast loop down to a text-only backbone.

The backbone is asked, in order: ``generate_from_embeds`` (path ``"generate_from_embeds"``),
a transformers-style ``generate(inputs_embeds=...)`` (``"generate(inputs_embeds)"``), a
``generate(input_ids=...)`` without embeddings (``"generate(input_ids)"``, text only), and
finally the generic loop of :func:`~vlmkit.generation.generate_from_embeds` on
``embed``/``forward``/``logits`` (``"decode_loop"``). Whatever ran, the backbone's output is
normalised to the new tokens, appended to the prompt, and recorded in a :class:`GenerationInfo`.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GenerationError, PackingError
from .defaults import context_length, default_pad_id, default_stop_ids
from .loop import left_aligned, run_loop, StreamAdapter
from .options import check_ids, check_options, check_prompt, check_room, check_streamer, make_generator, Options, with_seed

# The package's logger (its documented name), not this module's.
log = logging.getLogger("vlmkit.generation")

#: Path names recorded in :attr:`GenerationInfo.path`, in fallback order.
PATH_EMBEDS = "generate_from_embeds"
PATH_BACKBONE_EMBEDS = "generate(inputs_embeds)"
PATH_TEXT_ONLY = "generate(input_ids)"
PATH_DECODE_LOOP = "decode_loop"


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


def _hf_kwargs(opts: Options, stops: list[int], pad: int, streamer: Any) -> dict[str, Any]:
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


# ============================================================================== generate
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
    """Generate up to ``max_new_tokens`` after each prompt row; see :mod:`vlmkit.generation`.

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
    opts = check_options(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
    stops, pad = _check_call(model, input_ids, attention_mask, eos_token_id, pad_token_id, streamer, allow_text_only)
    check_room(input_ids.shape[1], opts.max_new_tokens, context_length(model.backbone))
    with torch.inference_mode():
        return _run(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, opts, stops, pad, streamer, allow_text_only)


def _check_call(
    model: Any, input_ids: Any, attention_mask: Any, eos_token_id: Any, pad_token_id: Any, streamer: Any,
    allow_text_only: Any,
) -> tuple[list[int], int]:  # fmt: skip
    """Validate :func:`generate`'s other arguments; ``(stop ids, pad id)`` with defaults resolved."""
    check_prompt(input_ids, attention_mask)
    vocab = getattr(model.backbone, "vocab_size", None)
    stops = check_ids("eos_token_id", eos_token_id, vocab, many=True)
    stops = default_stop_ids(model) if stops is None else stops
    pad = check_ids("pad_token_id", pad_token_id, vocab, many=False)
    pad = default_pad_id(model, stops) if pad is None else pad
    check_streamer(streamer)
    if not isinstance(allow_text_only, bool):
        raise GenerationError(f"allow_text_only must be True or False; got {allow_text_only!r}")
    return stops, pad


def _run(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, opts, stops, pad, streamer, allow_text_only):  # noqa: ANN001, PLR0913
    device = model.device
    started = time.perf_counter()
    input_ids = input_ids.to(device=device, dtype=torch.long)
    mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    if pixel_attention_mask is not None:
        pixel_attention_mask = pixel_attention_mask.to(device)
    path = _path(model.backbone)
    adapter = StreamAdapter(streamer, input_ids)
    dropped = False
    if path == PATH_TEXT_ONLY:
        out, dropped = _text_only(model, input_ids, mask, pixel_values, opts, stops, pad, adapter, allow_text_only)
        new = _new_tokens(out, input_ids, opts.max_new_tokens, path)
    else:
        new = _from_embeds(model, path, input_ids, mask, pixel_values, pixel_attention_mask, opts, stops, pad, adapter)
    _finish_stream(adapter, new)
    _record(model, path, started, adapter.first_token_at, new, input_ids.shape, dropped)
    return torch.cat([input_ids, new.to(device=device, dtype=torch.long)], dim=1)


def _from_embeds(model, path, input_ids, mask, pixel_values, pixel_attention_mask, opts, stops, pad, adapter):  # noqa: ANN001, PLR0913
    """Paths 1, 2 and 4: prefill (images merged into the prompt embeddings), then the backbone's
    ``generate_from_embeds``, its ``generate(inputs_embeds=...)`` or the generic loop."""
    backbone = model.backbone
    embeds = model.embed(input_ids, pixel_values, pixel_attention_mask)
    embeds, emask = left_aligned(embeds, mask)
    if path == PATH_BACKBONE_EMBEDS:
        out = with_seed(opts.seed, model.device, lambda: backbone.generate(
            inputs_embeds=embeds, attention_mask=emask, **_hf_kwargs(opts, stops, pad, adapter)
        ))
        return _new_tokens(out, input_ids, opts.max_new_tokens, path)
    generator = make_generator(opts.seed, model.device) if opts.do_sample else None
    if path == PATH_DECODE_LOOP:  # vlmkit's own loop: the options are checked already, run it as is
        return run_loop(backbone, embeds, emask, opts, generator=generator, stops=stops, pad=pad, streamer=adapter)
    gen = dict(
        max_new_tokens=opts.max_new_tokens, do_sample=opts.do_sample, temperature=opts.temperature,
        top_k=opts.top_k, top_p=opts.top_p, eos_token_id=list(stops) or None, pad_token_id=pad,
        streamer=adapter, generator=generator,
    )
    return _new_tokens(backbone.generate_from_embeds(embeds, emask, **gen), input_ids, opts.max_new_tokens, path)


def _finish_stream(adapter: StreamAdapter, new: torch.Tensor) -> None:
    """Deliver the tokens of a backbone that did not stream, then end the stream."""
    if adapter.steps == 0 and new.shape[1]:
        adapter.prompt_seen = True
        for column in new.unbind(1):
            adapter.put(column)
    adapter.end()


def _record(
    model: Any, path: str, started: float, first_token_at: float | None, new: torch.Tensor,
    prompt_shape: torch.Size, dropped: bool,
) -> None:  # fmt: skip
    """Set ``model.last_generation`` to this call's :class:`GenerationInfo` and log it."""
    finished = time.perf_counter()
    first = first_token_at or finished
    n_new = int(new.shape[1])
    decode_s = max(finished - first, 0.0)
    B, T = prompt_shape
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


# ============================================================================== path 3: text only
def _placeholders(model: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> tuple[int | None, bool]:
    """``(image placeholder id, whether the prompt holds any)``; placeholders without
    ``pixel_values`` are a :class:`~vlmkit.errors.PackingError`."""
    image_id = getattr(getattr(model, "packer", None), "image_token_id", None)
    has_placeholders = image_id is not None and bool((input_ids == image_id).any())
    if has_placeholders and pixel_values is None:
        raise PackingError(
            f"input_ids hold image placeholders (id {image_id}) but no pixel_values were given",
            hint="pass the processor's pixel_values, or remove the <image> tokens",
        )
    return image_id, has_placeholders


def _refuse_or_warn(backbone: Any, input_ids: torch.Tensor, image_id: int | None, allow_text_only: bool) -> None:
    """The images cannot reach ``backbone``: raise (``allow_text_only=False``) or warn that they
    are dropped. The warning points at the caller of :func:`generate`."""
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
        stacklevel=5,  # _refuse_or_warn <- _text_only <- _run <- generate <- the caller
    )


def _text_only(model, input_ids, mask, pixel_values, opts, stops, pad, adapter, allow_text_only):  # noqa: ANN001, PLR0913
    """Path 3: a backbone whose ``generate`` takes only ``input_ids``. Returns (output, dropped)."""
    backbone = model.backbone
    image_id, has_placeholders = _placeholders(model, input_ids, pixel_values)
    dropped = pixel_values is not None or has_placeholders
    ids = input_ids
    text_mask = mask if mask is not None else torch.ones_like(input_ids)
    if dropped:
        _refuse_or_warn(backbone, input_ids, image_id, allow_text_only)
        if has_placeholders:
            ids, text_mask = _strip_placeholders(input_ids, text_mask, image_id, pad)
    ids, text_mask = left_aligned(ids, text_mask)
    # The text-only backbone returns the prompt + new tokens (transformers' input_ids layout).
    out = with_seed(opts.seed, model.device, lambda: backbone.generate(
        input_ids=ids, attention_mask=text_mask, **_hf_kwargs(opts, stops, pad, adapter)
    ))
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
        out = out[:, ids.shape[1] :]
    return out, dropped
