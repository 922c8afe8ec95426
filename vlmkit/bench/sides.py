"""The two sides of the benchmark: :class:`VlmkitSide` and :class:`HFSide` (transformers), with the
same calls (load, vision encode, prefill, first token, decode), and the :class:`Clock` streamer
that times decoding."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .prompts import Prompt


class Clock:
    """A transformers-style streamer (``put``/``end``) that stamps each new token; ``sync`` (e.g.
    ``torch.cuda.synchronize``) waits for the device before each stamp."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.prompt_seen = False
        self.stamps: list[float] = []
        self.sync = sync

    def put(self, value) -> None:  # noqa: ANN001
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.sync is not None:
            self.sync()
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def tokens_per_s(self) -> float:
        if len(self.stamps) < 2 or self.stamps[-1] <= self.stamps[0]:
            return float("nan")
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def device_sync(device: Any) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA ``device``, else None (CPU calls return when done)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


class VlmkitSide:
    """vlmkit's calls, shaped like :class:`HFSide`'s; float32 on the CPU unless ``device`` and
    ``dtype`` say otherwise (as ``build_from_hf`` takes them)."""

    name = "vlmkit"

    def __init__(self, folder: Path, device: Any = None, dtype: Any = "float32") -> None:
        self.folder = folder
        self.device, self.dtype = device, dtype
        self.model = None

    def load(self):
        from ..builder import build_from_hf

        self.model = build_from_hf(self.folder, dtype=self.dtype, device=self.device)
        return self.model

    def encode(self, p: Prompt) -> None:
        self.model.encode_images(p.tensors["pixel_values"], p.tensors.get("pixel_attention_mask"))

    def prefill(self, p: Prompt) -> None:
        bb = self.model.backbone
        hidden = bb(bb.embed(p.tensors["input_ids"]))
        bb.logits(hidden[:, -1:])

    def first_token(self, p: Prompt) -> None:
        self.model.generate(**p.tensors, max_new_tokens=1)

    def decode(self, p: Prompt, new_tokens: int) -> float:
        clock = Clock(device_sync(self.device))
        self.model.generate(**p.tensors, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
        return clock.tokens_per_s()

    def greedy(self, ids, new_tokens: int):  # noqa: ANN001
        return self.model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])

    def logits(self, p: Prompt):
        return self.model(**p.tensors).logits


class HFSide:
    """transformers' ``AutoModelForImageTextToText`` on the same folder with sdpa attention,
    float32 on the CPU unless ``device`` and ``dtype`` say otherwise."""

    name = "transformers"

    def __init__(self, folder: Path, device: Any = None, dtype: Any = "float32") -> None:
        self.folder = folder
        self.device, self.dtype = device, dtype
        self.model = None
        self._gen = None

    def load(self):
        import torch
        import transformers

        dtype = self.dtype if isinstance(self.dtype, torch.dtype) else getattr(torch, self.dtype)
        model = transformers.AutoModelForImageTextToText.from_pretrained(self.folder, dtype=dtype, attn_implementation="sdpa")
        self.model = model.to(self.device or "cpu").eval()
        gen = copy.deepcopy(self.model.generation_config)
        gen.eos_token_id = None  # decode exactly the asked number of tokens, as vlmkit does
        gen.do_sample = False
        if gen.pad_token_id is None:
            gen.pad_token_id = 0
        self._gen = gen
        return self.model

    def _kw(self, p: Prompt, new_tokens: int) -> dict[str, Any]:
        gen = copy.copy(self._gen)
        gen.max_new_tokens = new_tokens
        gen.min_new_tokens = None
        return {**p.tensors, "generation_config": gen}

    def encode(self, p: Prompt) -> None:
        self.model.model.get_image_features(
            pixel_values=p.tensors["pixel_values"], pixel_attention_mask=p.tensors.get("pixel_attention_mask")
        )

    def prefill(self, p: Prompt) -> None:
        text_model = self.model.model.text_model
        embeds = text_model.get_input_embeddings()(p.tensors["input_ids"])
        out = text_model(inputs_embeds=embeds, use_cache=False)
        self.model.lm_head(out.last_hidden_state[:, -1:])

    def first_token(self, p: Prompt) -> None:
        self.model.generate(**self._kw(p, 1))

    def decode(self, p: Prompt, new_tokens: int) -> float:
        clock = Clock(device_sync(self.device))
        self.model.generate(**self._kw(p, new_tokens), streamer=clock)
        return clock.tokens_per_s()

    def logits(self, p: Prompt):
        return self.model(**p.tensors).logits
