"""A tiny random SmolVLM-256M-layout checkpoint folder with the published tokenizer, for the server tests.

The bundled SmolVLM-256M-Instruct files (tokenizer, chat template, processor and generation
configs) are copied; ``config.json`` keeps the published vocabulary and image token but shrinks
every width and depth (64-px tiles of 16-px patches, scale 2: 4 visual tokens per tile, up to 4x4
tiles + global); the weights are a random transformers ``AutoModelForImageTextToText`` saved with
``save_pretrained``. Made once per test process (about 4 s).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..conftest import published_folder

__all__ = ["tiny_smolvlm_folder", "CONTEXT", "load_tiny"]

#: max_position_embeddings of the tiny model: room for long generations in the timeout tests.
CONTEXT = 4096


def _shrink(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(scale_factor=2, torch_dtype="float32")
    text = cfg["text_config"]
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, max_position_embeddings=CONTEXT, pixel_shuffle_factor=2, torch_dtype="float32")  # fmt: skip
    text["perceiver_config"]["resampler_n_latents"] = 4
    cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                                patch_size=16, max_image_size={"longest_edge": 64}, size={"longest_edge": 256})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre.update(max_image_size={"longest_edge": 64}, size={"longest_edge": 256})
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    proc = json.loads((folder / "processor_config.json").read_text())
    proc["image_seq_len"] = 4
    (folder / "processor_config.json").write_text(json.dumps(proc, indent=2))


@functools.cache
def tiny_smolvlm_folder() -> Path:
    """The folder (read-only by convention; copy it to damage it)."""
    import transformers

    root = Path(tempfile.mkdtemp(prefix="vlmkit-tiny-smolvlm-"))
    atexit.register(shutil.rmtree, root, True)
    folder = root / "tiny-smolvlm"
    shutil.copytree(published_folder("SmolVLM-256M-Instruct"), folder)
    _shrink(folder)
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_config(config).to(torch.float32).eval()
    with torch.no_grad():  # transformers inits some weights at 0 / 1: randomise them all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return folder


def load_tiny():
    """``(model, processor)`` of :func:`tiny_smolvlm_folder` (the published files' eos disagreement
    warning silenced: it is by design)."""
    import vlmkit

    folder = tiny_smolvlm_folder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vlmkit.build_from_hf(folder), vlmkit.load_processor(folder)
