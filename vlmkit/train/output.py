"""The run folder a training run ends with: spec, weights, processor files, recipe, metrics.

Layout (``output_dir``)::

    vlmkit.yaml            the model spec; weights: . and tokenizer: . (the folder itself)
    model.safetensors      every slot, exported through its key_map (LoRA merged by default)
    adapter/               with save_adapter: adapter_config.json + adapter_model.safetensors (peft)
    config.json            the model's transformers config when a family can write one, else the tokenizer's
    tokenizer.json, ...    the tokenizer, chat template and image settings
    recipe.yaml            the recipe this run followed
    metrics.jsonl, loss.png, checkpoints/

``vlmkit.yaml`` is written last (each file via a temporary name and ``os.replace``), so a folder
is a run folder (:mod:`vlmkit.run_folder`) only once everything else is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..errors import TrainingError
from ..export import TOKENIZER_FILES
from ..family import checkpoint_key_map
from ..protocols import SLOTS
from ..run_folder import RUN_SPEC_NAME
from ..weights import save_safetensors
from .slots import lora_state_dict

__all__ = ["export_weights", "write_run_folder", "apply_adapter", "ADAPTER_DIR"]

ADAPTER_DIR = "adapter"


def export_weights(model: Any, family: Any = None) -> dict[str, Any]:
    """Every slot's tensors named as ``family``'s checkpoints name them (the family of the run
    folder's ``config.json``; ``None``: the components' own names), LoRA tensors left out."""
    tensors: dict[str, Any] = {}
    for slot in SLOTS:
        module = getattr(model, slot)
        bare = _unwrapped(module) if _has_lora(module) else module
        exported = checkpoint_key_map(family, slot, bare.key_map()).export(bare.state_dict())
        clash = sorted(set(exported) & set(tensors))
        if clash:
            raise TrainingError(f"slot {slot} exports tensor names another slot uses: {', '.join(clash[:4])}",
                                hint="give the components distinct checkpoint prefixes")  # fmt: skip
        tensors.update(exported)
    return tensors


def _has_lora(module: Any) -> bool:
    return any("lora_" in n for n, _ in module.named_parameters())


def _unwrapped(module: Any) -> Any:
    """A copy of a slot that still holds (unmerged) adapters, with its base layers as trained and
    no adapters (a key map may list the module's own state_dict names)."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    bare = copy.deepcopy(module)
    for name, sub in list(bare.named_modules()):
        if isinstance(sub, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = bare.get_submodule(parent_name) if parent_name else bare
            setattr(parent, child, sub.get_base_layer())
    return bare


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _atomic_write(dst: Path, text: str) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, dst)


def write_run_folder(folder: Path, model: Any, processor_folder: Path, recipe: Any, *, save_adapter: bool) -> Path:
    """Write the final run folder (main process only); see the module docstring."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    family = _config_family(model, processor_folder)
    save_safetensors(export_weights(model, family), tmp, metadata={"format": "pt", "written_by": "vlmkit train"})
    os.replace(tmp, folder / "model.safetensors")
    if save_adapter:
        _write_adapter(folder / ADAPTER_DIR, model)
    _copy_processor_files(processor_folder, folder, recipe.image_splitting)
    _write_config(folder, model, processor_folder)
    _atomic_write(folder / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    spec = model.spec.to_dict()
    spec["weights"] = "."
    spec["tokenizer"] = "."
    spec.pop("freeze", None)
    header = "# Written by `vlmkit train`: the trained model. vlmkit.build(THIS_FOLDER) loads it.\n"
    _atomic_write(folder / RUN_SPEC_NAME, header + yaml.safe_dump(spec, sort_keys=False))
    return folder


def _config_family(model: Any, processor_folder: Path) -> Any:
    """The family of the ``config.json`` :func:`_write_config` writes (the loader reads the
    weights through it): the model's own when one can describe it, else the tokenizer checkpoint's."""
    from ..export import hf_config
    from ..hf import family_of_folder

    family, _ = hf_config(model.spec)
    return family if family is not None else family_of_folder(processor_folder)


def _write_config(folder: Path, model: Any, processor_folder: Path) -> None:
    """``config.json``: the model's own transformers config when a family can write one (the folder
    is then also a transformers checkpoint), else the tokenizer checkpoint's (the processor reads
    its model family and token ids from it; the architecture is vlmkit.yaml's)."""
    from ..export import hf_config

    _, config = hf_config(model.spec)
    if config is not None:
        config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        _atomic_write(folder / "config.json", json.dumps(config, indent=2) + "\n")
    elif (processor_folder / "config.json").is_file() and processor_folder.resolve() != folder.resolve():
        _atomic_copy(processor_folder / "config.json", folder / "config.json")


def _copy_processor_files(src: Path, dst: Path, image_splitting: bool | None) -> None:
    if src.resolve() == dst.resolve():
        return  # training an earlier run's folder into itself: the files are there
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            _atomic_copy(src / name, dst / name)
    pre = dst / "preprocessor_config.json"
    if image_splitting is not None and pre.is_file():
        data = json.loads(pre.read_text(encoding="utf-8"))
        data["do_image_splitting"] = bool(image_splitting)
        _atomic_write(pre, json.dumps(data, indent=2) + "\n")


def _write_adapter(folder: Path, model: Any) -> None:
    """peft-style ``adapter_config.json`` (one config per slot) + ``adapter_model.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    configs = {}
    for slot in SLOTS:
        cfg = getattr(getattr(model, slot), "peft_config", {}).get("default")
        if cfg is not None:
            configs[slot] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
    save_safetensors(lora_state_dict(model), folder / "adapter_model.safetensors")
    _atomic_write(folder / "adapter_config.json", json.dumps(configs, indent=2, default=str) + "\n")


def apply_adapter(model: Any, folder: str | os.PathLike) -> Any:
    """Inject the adapters a run saved with ``save_adapter`` (``folder``: the run folder or its
    ``adapter/``) into ``model`` (built from the run folder) and load their weights; returns it."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    folder = folder / ADAPTER_DIR if (folder / ADAPTER_DIR).is_dir() else folder
    if not (folder / "adapter_config.json").is_file():
        raise TrainingError(f"no adapter_config.json in {folder}", hint="train with --save-adapter to keep the adapters")
    configs = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for slot, raw in configs.items():
        keep = {k: v for k, v in raw.items() if k in LoraConfig.__dataclass_fields__ and k not in ("peft_type", "task_type")}
        module = getattr(model, slot)
        inject_adapter_in_model(LoraConfig(**keep), module, adapter_name="default")
        own = {k[len(slot) + 1 :]: v for k, v in tensors.items() if k.startswith(slot + ".")}
        set_peft_model_state_dict(module, own, adapter_name="default")
    return model
