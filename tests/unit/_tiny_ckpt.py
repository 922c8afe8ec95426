"""One tiny random transformers Idefics3 checkpoint per test process, for the bad-input tests.

Made with :mod:`tests.parity.tiny_hf` (``save_pretrained`` of a random
``Idefics3ForConditionalGeneration``) the first time it is asked for; tests copy it before
damaging it.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from ..parity.tiny_hf import IMAGE_TOKEN, SHAPES, VOCAB, make_batch, make_checkpoint

__all__ = ["SHAPE", "IMAGE_TOKEN", "VOCAB", "tiny_checkpoint", "copy_checkpoint", "batch"]

#: 48 px images, 8 px patches, scale 2: 9 visual tokens per image; vocab 300, image token 290.
SHAPE = SHAPES[0]


@functools.cache
def tiny_checkpoint() -> Path:
    """A read-only-by-convention checkpoint folder (config.json + model.safetensors)."""
    root = Path(tempfile.mkdtemp(prefix="vlmkit-tiny-ckpt-"))
    atexit.register(shutil.rmtree, root, True)
    folder = root / "ckpt"
    make_checkpoint(SHAPE, folder)
    return folder


def copy_checkpoint(dst: Path) -> Path:
    """A private copy of :func:`tiny_checkpoint` at ``dst`` (to damage in a test)."""
    shutil.copytree(tiny_checkpoint(), dst)
    return dst


def batch():
    """``input_ids, attention_mask, pixel_values, pixel_attention_mask`` for :data:`SHAPE`:
    two samples with 2 and 1 images (9 placeholders each), padded pixels and left padding."""
    return make_batch(SHAPE)
