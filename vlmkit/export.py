"""Export: a vlmkit model -> a Hugging Face checkpoint folder, by inverting the key maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import VlmkitError
from .family import Family, checkpoint_key_map
from .weights import save_safetensors

__all__ = ["save_hf", "hf_config", "checkpoint_tensors", "TOKENIZER_FILES"]

#: Non-weight files copied from the spec's tokenizer folder, when it is local.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "generation_config.json",
)  # fmt: skip


def save_hf(model, folder: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files) that transformers loads.

    Raises :class:`VlmkitError` when no installed family can describe the model's slot
    combination as a transformers config.
    """
    family, config = hf_config(model.spec)
    if config is None:
        names = ", ".join(f"{s}={getattr(model.spec, s).name}" for s in ("vision_tower", "connector", "backbone"))
        raise VlmkitError(
            f"no installed plugin can write a Hugging Face config for this combination ({names})",
            hint="export is available for slot combinations a family's transformers class can represent "
            "(`vlmkit plugins` lists the families)",
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    tensors = checkpoint_tensors(model, family)
    save_safetensors(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _copy_tokenizer(model.spec.tokenizer, folder)
    return folder


def hf_config(spec) -> tuple[Family | None, dict | None]:
    """``(family, config.json)`` from the first family that can represent ``spec`` (``(None, None)``: none can)."""
    from .plugins import get_registry

    for family in get_registry().families():
        config = family.config_from_spec(spec)
        if config is not None:
            return family, config
    return None, None


def checkpoint_tensors(model, family: Family | None) -> dict:
    """Every slot's tensors under the names ``family``'s checkpoints use (fused tensors split
    back by inverting the key maps); ``family=None``: the components' own names."""
    tensors: dict = {}
    for slot, module in model.slots().items():
        tensors.update(checkpoint_key_map(family, slot, module.key_map()).export(module.state_dict()))
    return tensors


def _copy_tokenizer(source: str | None, folder: Path) -> None:
    if not source or not Path(source).is_dir():
        return
    for name in TOKENIZER_FILES:
        src = Path(source) / name
        if src.is_file() and not (folder / name).exists():
            shutil.copyfile(src, folder / name)
