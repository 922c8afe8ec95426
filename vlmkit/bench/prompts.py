"""Benchmark inputs: the prompt texts, :class:`Prompt` and :func:`make_prompts` (the same tensors
for both sides, made by vlmkit's processor when the folder has a tokenizer, else synthetic ids and
pixels), and the token ids of the int8 agreement prompt set."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANY_TILES = 17
TEXT_PROMPT = "Describe the water cycle in a few sentences."
IMAGE_PROMPT = "Describe this image."
#: Greedy tokens per prompt in the agreement check (vlmkit's schemes and llama.cpp's kinds alike).
AGREEMENT_TOKENS = 16
#: The fixed prompt set of the int8 agreement check (chat checkpoints).
AGREEMENT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain gravity to a child.",
    "What is 12 times 7?",
    "Name a famous painter.",
    "How do plants make food?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water?",
    "Give me a tip for sleeping better.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in one sentence.",
    "What does a computer do?",
    "Why is the sky blue?",
    "Name three fruits.",
    "What is the largest ocean?",
    "How many legs does a spider have?",
    "Suggest a name for a dog.",
    "What is photosynthesis?",
    "Tell me a fun fact about space.",
    "What is the opposite of hot?",
    "How do you make tea?",
    "What color is grass?",
    "Summarize the water cycle.",
)


@dataclass
class Prompt:
    """Tensors for one prompt (batch of 1): ``input_ids``, ``attention_mask`` and, with images,
    ``pixel_values`` / ``pixel_attention_mask``."""

    name: str
    tensors: dict[str, Any]
    tiles: int

    @property
    def length(self) -> int:
        return int(self.tensors["input_ids"].shape[1])


def noise_image(size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(size // 16, 1), max(size // 16, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BILINEAR)


def bench_processor(folder: Path):
    """vlmkit's processor for ``folder``, or None when it has no usable tokenizer/template."""
    from ..errors import VlmkitError
    from ..processor import load_processor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            proc = load_processor(folder)
            proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
            return proc
        except (VlmkitError, OSError, ValueError, KeyError):
            return None


def checkpoint_facts(folder: Path) -> dict[str, Any]:
    """What the synthetic inputs need, read from the folder's config (no model needed)."""
    from ..hf import spec_from_hf

    spec = spec_from_hf(folder)
    tower = dict(spec.vision_tower.params)
    backbone = dict(spec.backbone.params)
    side = int(tower.get("image_size", 224))
    patch = int(tower.get("patch_size", 16))
    scale = int(dict(spec.connector.params).get("scale_factor", 1))
    return {
        "image_size": side,
        "tokens_per_image": (side // patch // scale) ** 2,
        "image_token_id": int(spec.packer.params.image_token_id),
        "vocab_size": int(backbone.get("vocab_size", 1000)),
    }


def make_prompts(folder: str | os.PathLike, tiles: Sequence[int] = (0, 1, MANY_TILES)) -> dict[int, Prompt]:
    """Prompt tensors per tile count (0 = text only), the same for both sides."""
    folder = Path(folder)
    proc = bench_processor(folder)
    if proc is not None:
        return {n: processor_prompt(proc, n) for n in tiles}
    facts = checkpoint_facts(folder)
    return {n: synthetic_prompt(facts, n) for n in tiles}


def processor_prompt(proc, tiles: int) -> Prompt:
    content = [{"type": "image"}] if tiles else []
    content.append({"type": "text", "text": IMAGE_PROMPT if tiles else TEXT_PROMPT})
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    if not tiles:
        return Prompt("text only", dict(proc(text=text)), 0)
    size = getattr(proc, "input_size", None)  # the tower's input: a tile, or a family's one image
    tile = size[0] if isinstance(size, tuple) and size[0] > 0 else 512
    if tiles == 1:
        one = {} if getattr(proc, "image_splitting", False) is None else {"do_image_splitting": False}
        batch = proc(text=text, images=[noise_image(tile, 1)], **one)
    else:
        side = tile * math.isqrt(tiles - 1)  # a square image: (sqrt(tiles-1))^2 tiles + the global one
        batch = proc(text=text, images=[noise_image(side, 2)], do_image_splitting=True, longest_edge=side)
    got = int(batch["pixel_values"].shape[1])
    return Prompt(f"{got} tile{'s' if got > 1 else ''}", dict(batch), got)


def synthetic_prompt(facts: dict[str, Any], tiles: int) -> Prompt:
    import torch

    g = torch.Generator().manual_seed(1234 + tiles)
    image_id, vocab, k, side = facts["image_token_id"], facts["vocab_size"], facts["tokens_per_image"], facts["image_size"]
    hi = min(vocab, image_id) if image_id > 8 else vocab
    hi = min(hi, 5000)

    def words(n: int) -> list[int]:
        return [i if i != image_id else 3 for i in torch.randint(3, max(hi, 4), (n,), generator=g).tolist()]

    ids = words(12)
    for _ in range(tiles):
        ids += [image_id] * k + words(1)
    ids += words(4)
    tensors: dict[str, Any] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }
    if tiles:
        tensors["pixel_values"] = torch.randn(1, tiles, 3, side, side, generator=g)
        tensors["pixel_attention_mask"] = torch.ones(1, tiles, side, side, dtype=torch.long)
    return Prompt("text only" if not tiles else f"{tiles} tile{'s' if tiles > 1 else ''}", tensors, tiles)


def agreement_prompts(folder: Path) -> list:
    """Input ids of :data:`AGREEMENT_PROMPTS` (chat-templated by the folder's processor), else 12
    random ids per prompt."""
    import torch

    proc = bench_processor(folder)
    if proc is not None:
        texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": t}]}]) for t in AGREEMENT_PROMPTS]
        return [proc(text=t)["input_ids"] for t in texts]
    facts = checkpoint_facts(folder)
    g = torch.Generator().manual_seed(99)
    hi = min(facts["vocab_size"], facts["image_token_id"], 5000)
    return [torch.randint(3, max(hi, 4), (1, 12), generator=g) for _ in AGREEMENT_PROMPTS]
