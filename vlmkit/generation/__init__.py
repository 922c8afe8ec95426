"""Text generation for :class:`~vlmkit.model.VLM`: greedy and sampled decoding, streaming.

``generate(model, input_ids, ...)`` returns a ``(B, T_prompt + T_new)`` LongTensor laid out as
transformers' ``generate(input_ids=...)`` returns it: the prompt as given, then the new tokens;
a row that stopped early is padded with ``pad_token_id``; ``T_new`` is the number of steps run
(``max_new_tokens``, or fewer when every row stopped).

**The fallback chain.** Images are encoded once and merged into the prompt embeddings by
``model.embed`` (the prefill); then the backbone is asked, in this order:

1. ``backbone.generate_from_embeds(inputs_embeds, attention_mask, **gen)`` when it has one (a
   backbone with a decode loop of its own) -- path ``"generate_from_embeds"``;
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
4. a backbone with none of these (only the protocol's ``embed``/``forward``/``logits``, e.g.
   :class:`~vlmkit.components.llama.LlamaBackbone`) runs vlmkit's decode loop
   (:mod:`~vlmkit.generation.loop`) on the options checked here, once -- path ``"decode_loop"``
   (with a KV cache grown on demand when the backbone has ``new_cache``, else re-running the
   whole sequence each step).

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
the checkpoint's eos ids as its processor resolves them (``generation_config.json``,
``config.json`` and the family's turn-end token), else the backbone's ``eos_token_id``. Each row stops on its own; generation ends when every row has
stopped. ``pad_token_id`` defaults to :func:`default_pad_id`.

**Streaming.** ``streamer`` is a callable ``fn(token_ids: list[int])`` called once per step with
each row's new token (rows that stopped get ``pad_token_id``), or an object with ``put(tensor)``
and ``end()`` -- transformers' ``TextStreamer`` protocol: ``put`` first receives the prompt ids,
then each step's ``(B,)`` tokens, then ``end()`` is called. :func:`stream` yields decoded text
chunks as they are generated.

**Layout.** This package splits the work into modules; everything public is re-exported here:

- :mod:`~vlmkit.generation.defaults` -- :func:`default_stop_ids` and :func:`default_pad_id`,
  read from the checkpoint's files and the backbone's params;
- :mod:`~vlmkit.generation.options` -- argument validation, the token chooser (greedy, or
  temperature/top-k/top-p sampling) and seeded randomness;
- :mod:`~vlmkit.generation.loop` -- the preallocated decode loop, :func:`generate_from_embeds`
  and the streamer adapter every path reports through;
- :mod:`~vlmkit.generation.chain` -- :func:`generate`: the fallback chain, output normalisation,
  :class:`GenerationInfo` and the ``PATH_*`` names;
- :mod:`~vlmkit.generation.streaming` -- :func:`stream`.
"""

from __future__ import annotations

from .chain import (
    PATH_BACKBONE_EMBEDS,
    PATH_DECODE_LOOP,
    PATH_EMBEDS,
    PATH_TEXT_ONLY,
    GenerationInfo,
    generate,
)
from .defaults import context_length, default_pad_id, default_stop_ids
from .loop import generate_from_embeds
from .options import check_options, check_room
from .streaming import IncrementalText, stream

__all__ = [
    "generate",
    "generate_from_embeds",
    "stream",
    "IncrementalText",
    "check_options",
    "check_room",
    "context_length",
    "default_stop_ids",
    "default_pad_id",
    "GenerationInfo",
    "PATH_EMBEDS",
    "PATH_BACKBONE_EMBEDS",
    "PATH_TEXT_ONLY",
    "PATH_DECODE_LOOP",
]
