"""Tiny random transformers Idefics3/SmolVLM checkpoints, built in the test (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 300
IMAGE_TOKEN = 290


@dataclass(frozen=True)
class Shape:
    """One tiny architecture."""

    name: str
    model_type: str = "idefics3"
    scale: int = 2
    image_size: int = 48
    patch_size: int = 8
    vision_width: int = 32
    vision_heads: int = 4
    text_width: int = 48
    heads: int = 4
    kv_heads: int = 2
    tie: bool = False

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size // self.scale) ** 2


SHAPES = [
    Shape("idefics3-s2-gqa"),
    Shape("smolvlm-s3-mha-tied", model_type="smolvlm", scale=3, image_size=72, kv_heads=4, tie=True),
    Shape("idefics3-s4-mqa-odd", scale=4, image_size=64, vision_width=36, vision_heads=3, text_width=60, heads=5, kv_heads=1),
    Shape("smolvlm-s2-odd-untied", model_type="smolvlm", patch_size=12, vision_width=24, vision_heads=2, text_width=40, heads=5, kv_heads=5),
]


def hf_config(shape: Shape):
    import transformers

    vision = dict(hidden_size=shape.vision_width, intermediate_size=2 * shape.vision_width, num_hidden_layers=2,
                  num_attention_heads=shape.vision_heads, image_size=shape.image_size, patch_size=shape.patch_size)
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=shape.text_width, intermediate_size=2 * shape.text_width + 8,
                num_hidden_layers=2, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                rms_norm_eps=1e-5, rope_theta=50000.0,  # not the 10000 default: catches a dropped rope key
                pad_token_id=0, tie_word_embeddings=shape.tie)
    cls = transformers.SmolVLMConfig if shape.model_type == "smolvlm" else transformers.Idefics3Config
    return cls(vision_config=vision, text_config=text, scale_factor=shape.scale, image_token_id=IMAGE_TOKEN,
               tie_word_embeddings=shape.tie, vocab_size=VOCAB)


def make_checkpoint(shape: Shape, folder: Path, seed: int = 0):
    """Save a random transformers model of ``shape`` to ``folder``; returns the model (eval, fp32)."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(shape)
    cls = transformers.SmolVLMForConditionalGeneration if shape.model_type == "smolvlm" else transformers.Idefics3ForConditionalGeneration
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():  # transformers inits some weights at 0 / 1; randomise so parity means something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return model


def make_batch(shape: Shape, images_per_sample=(2, 1), text_len=7, left_pad=(0, 3), seed=1):
    """A batch with several images per sample, an all-zero padding image, partly padded pixels
    and left padding. Returns input_ids, attention_mask, pixel_values, pixel_attention_mask."""
    g = torch.Generator().manual_seed(seed)
    k, side = shape.tokens_per_image, shape.image_size
    rows = []
    for n_img in images_per_sample:
        ids = torch.randint(3, IMAGE_TOKEN - 10, (text_len,), generator=g).tolist()
        for _ in range(n_img):
            ids += [IMAGE_TOKEN] * k + torch.randint(3, IMAGE_TOKEN - 10, (2,), generator=g).tolist()
        rows.append(ids)
    width = max(len(r) + pad for r, pad in zip(rows, left_pad))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (r, pad) in enumerate(zip(rows, left_pad)):
        start = width - len(r)
        input_ids[b, start:] = torch.tensor(r)
        attention_mask[b, start:] = 1
    n_max = max(images_per_sample)
    pixel_values = torch.zeros(len(rows), n_max, 3, side, side)
    pixel_mask = torch.zeros(len(rows), n_max, side, side, dtype=torch.long)
    for b, n_img in enumerate(images_per_sample):
        for i in range(n_img):
            h = side if i == 0 else side - shape.patch_size - 3  # partly padded pixels
            w = side if i == 0 else side // 2 + 1
            pixel_values[b, i, :, :h, :w] = torch.randn(3, h, w, generator=g)
            pixel_mask[b, i, :h, :w] = 1
    return input_ids, attention_mask, pixel_values, pixel_mask
