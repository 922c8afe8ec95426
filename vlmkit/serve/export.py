"""``vlmkit export SOURCE OUT``: a Hugging Face folder that vLLM, TGI and transformers load.

:meth:`vlmkit.model.VLM.save_pretrained` writes ``config.json`` and ``model.safetensors`` (the
key maps inverted) and copies the tokenizer files when the spec's tokenizer is a local folder.
:func:`export_folder` adds what a server needs beside them -- the processor, tokenizer and chat
template files of the checkpoint the tokenizer comes from, wherever it is (a Hub id resolves to
its cached or bundled files) -- so ``AutoProcessor`` and ``AutoModelForImageTextToText`` load the
folder as they load the original. :func:`check_export` loads it with transformers and compares
the logits of one image prompt with vlmkit's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import VlmkitError
from ..export import TOKENIZER_FILES
from ..hf import resolve_config_folder

__all__ = ["export_folder", "check_export"]


def export_folder(model: Any, source: str, out: str | Path) -> Path:
    """Write ``model`` to the new (or empty) folder ``out``; returns it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VlmkitError(f"{str(out)!r} already exists and is not an empty folder",
                          hint="export into a new folder (nothing is overwritten)")  # fmt: skip
    if _is_quantized(model):
        raise VlmkitError("an int8-quantized model cannot be exported", hint="export the float model (no --int8)")
    folder, _ = resolve_config_folder(model.spec.tokenizer or source)
    _check_processor_files(model, folder)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        src = Path(folder) / name
        if src.is_file() and not (out / name).exists():
            shutil.copyfile(src, out / name)
    return out


def _check_processor_files(model: Any, folder: Path) -> None:
    """Refuse when the processor files to be copied would cut images for another vision tower
    (e.g. a model YAML that swapped the tower): transformers would feed the model wrong inputs."""
    import warnings

    from ..processor import load_processor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checkpoint's own file disagreements were reported when it loaded
        files = load_processor(folder)
    tile, tokens = model.vision_tower.image_size, model.packer.tokens_per_image
    height, width = files.input_size
    cut = str(height) if height == width else f"{height}x{width}"
    if (files.input_size, files.image_seq_len) != ((tile, tile), tokens):
        raise VlmkitError(
            f"the processor files of {str(folder)!r} cut {cut}-px tiles of {files.image_seq_len} visual "
            f"tokens, but this model's vision tower takes {tile}-px tiles and makes {tokens} tokens each: a Hugging "
            "Face processor loaded from the exported folder would give it wrong inputs",
            hint="export models whose tower matches the tokenizer checkpoint's processor (vlmkit's own processor adapts; "
                 "transformers' does not)",
        )  # fmt: skip


def _is_quantized(model: Any) -> bool:
    from ..quantize import Int8Linear

    return any(isinstance(m, Int8Linear) for m in model.modules())


def check_export(model: Any, processor: Any, out: Path) -> float:
    """Max |logits difference| between ``model`` and transformers' load of ``out`` on one image
    prompt. Both processors must give the same token ids; both models then read transformers'
    tensors (its default image backend rounds pixels differently from vlmkit's by a few uint8
    levels, which is the processors' business, not the export's)."""
    import transformers
    from PIL import Image

    image = Image.radial_gradient("L").convert("RGB").resize((96, 64))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    ours_in = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=[image])
    hf_proc = transformers.AutoProcessor.from_pretrained(out)
    hf_in = hf_proc(text=hf_proc.apply_chat_template(messages, add_generation_prompt=True), images=[image], return_tensors="pt")
    if not torch.equal(hf_in["input_ids"], ours_in["input_ids"]):
        raise VlmkitError(f"transformers' processor for {str(out)!r} tokenizes the prompt differently from vlmkit's",
                          hint="compare the exported tokenizer/processor files with the source checkpoint's")  # fmt: skip
    hf = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    inputs = {k: hf_in[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask") if k in hf_in}
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(**inputs).logits
    return float((theirs - ours).abs().max())
