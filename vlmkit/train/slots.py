"""The model side of training: load model + processor, freeze by slot, LoRA through peft, checks.

LoRA adapters are injected into a slot's own module (``peft.inject_adapter_in_model``), so the
model keeps its structure and forward; :func:`merge_lora` folds them back into plain Linear
layers, after which every slot's ``key_map()`` exports its weights as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RecipeError, TrainingError
from ..protocols import SLOTS
from .recipe import LoraSpec, StageSpec

__all__ = ["load_model", "setup_stage", "merge_lora", "lora_state_dict", "check_fit", "check_vocab", "preflight", "lora_targets",
           "ADAPTER"]  # fmt: skip

#: peft's adapter name for every LoRA vlmkit injects.
ADAPTER = "default"


def load_model(source: str, seed: int) -> tuple[Any, Any, Path]:
    """``(model, processor, processor_folder)`` for a model YAML, checkpoint folder or run folder.

    ``torch.manual_seed(seed)`` runs first, so parameters without pretrained weights get the
    same fresh init every time (a resumed run rebuilds exactly the model it started from).
    """
    from ..builder import build, build_from_hf
    from ..processor import load_processor

    torch.manual_seed(seed)
    is_yaml = os.fspath(source).endswith((".yaml", ".yml"))
    model = build(source) if is_yaml else build_from_hf(source)
    tokenizer = model.spec.tokenizer
    if tokenizer is None:
        if is_yaml:
            raise RecipeError(f"the model YAML {source!r} names no `tokenizer:`, so the rows cannot be tokenized",
                              key_path="model", hint="add `tokenizer: <checkpoint folder or repo id>` to the model YAML")  # fmt: skip
        tokenizer = source
    from ..hf import resolve_config_folder
    from ..processor import TextTokenizer

    folder, _ = resolve_config_folder(tokenizer)
    check_vocab(model, TextTokenizer.from_folder(folder))  # before the processor's own checks: the plainer message
    processor = load_processor(tokenizer, spec=model.spec)
    return model, processor, Path(folder)


def check_vocab(model: Any, tokenizer: Any) -> None:
    """Raise :class:`TrainingError` when the tokenizer makes ids the backbone has no row for."""
    vocab = tokenizer.vocab_size
    if vocab > model.backbone.vocab_size:
        raise TrainingError(
            f"the tokenizer has {vocab} ids but the backbone's vocabulary (vocab_size) is {model.backbone.vocab_size}: "
            "the rows would hold ids the model has no embedding for",
            hint="train with the model's own tokenizer, or raise backbone.vocab_size to at least the tokenizer's size",
        )


def check_fit(model: Any, processor: Any) -> None:
    """Raise :class:`TrainingError` when the processor and the model's widths cannot fit together."""
    check_vocab(model, processor.tokenizer)
    if processor.image_token_id != model.packer.image_token_id:
        raise TrainingError(
            f"the processor writes image placeholder id {processor.image_token_id} but the packer looks for "
            f"{model.packer.image_token_id}", hint="set packer.image_token_id to the tokenizer's <image> id",
        )
    if processor.image_seq_len != model.packer.tokens_per_image:
        raise TrainingError(
            f"the processor writes {processor.image_seq_len} placeholders per image tile but the connector makes "
            f"{model.packer.tokens_per_image} visual tokens", hint="load the processor with the model's spec",
        )
    side = model.vision_tower.image_size
    if processor.input_size != (side, side):
        height, width = processor.input_size
        raise TrainingError(
            f"the processor gives the vision tower {height}x{width}-pixel images but it takes {side}x{side}",
            hint="load the processor with the model's spec",
        )


def lora_targets(module: nn.Module, lora: LoraSpec, slot: str, vocab_size: int, where: str) -> list[str]:
    """Names of the Linear layers of ``module`` that get adapters; :class:`RecipeError` when none."""
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if lora.target_modules is None:
        chosen = [n for n in linears if module.get_submodule(n).out_features != vocab_size]
    else:
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in lora.target_modules)]
    if not chosen:
        listed = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears})) or "(none)"
        wanted = "any Linear layer" if lora.target_modules is None else f"target_modules {lora.target_modules}"
        raise RecipeError(f"LoRA on slot {slot!r} matches no Linear layer ({wanted}); its Linear layers are: {listed}",
                          key_path=f"{where}.lora", hint="pick slots with Linear layers, or fix target_modules")  # fmt: skip
    return chosen


def preflight(model: Any, recipe: Any) -> None:
    """Check every stage against the model before anything is written: LoRA targets exist, and
    something has parameters to train."""
    for i, stage in enumerate(recipe.stages):
        where = f"stages.{i}"
        n = sum(p.numel() for slot in stage.train for p in getattr(model, slot).parameters())
        for slot in stage.lora.slots if stage.lora else []:
            n += len(lora_targets(getattr(model, slot), stage.lora, slot, model.backbone.vocab_size, where))
        if n == 0:
            raise RecipeError(f"nothing to train: slot(s) {', '.join(stage.train)} have no parameters",
                              key_path=f"{where}.train", hint="list slots with parameters (`vlmkit inspect` shows the counts)")  # fmt: skip


def setup_stage(model: Any, stage: StageSpec, where: str, *, gradient_checkpointing: bool = False) -> list[str]:
    """Freeze every slot but ``stage.train``, inject ``stage.lora``; returns the trainable names."""
    from peft import LoraConfig, inject_adapter_in_model

    for slot in SLOTS:
        getattr(model, slot).requires_grad_(slot in stage.train)
    if stage.lora is not None:
        for slot in stage.lora.slots:
            module = getattr(model, slot)
            targets = lora_targets(module, stage.lora, slot, model.backbone.vocab_size, where)
            config = LoraConfig(r=stage.lora.r, lora_alpha=stage.lora.alpha, lora_dropout=stage.lora.dropout,
                                target_modules=targets, bias="none")  # fmt: skip
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
            for name, p in module.named_parameters():
                p.requires_grad_("lora_" in name)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if gradient_checkpointing:
        _checkpoint_blocks(model, [*stage.train, *(stage.lora.slots if stage.lora else [])])
    return trainable


def _checkpoint_blocks(model: Any, slots: list[str]) -> None:
    """Recompute each block of the slots' ``nn.ModuleList`` s in backward (activation checkpointing)."""
    from torch.utils.checkpoint import checkpoint

    for slot in slots:
        for module in getattr(model, slot).modules():
            if isinstance(module, nn.ModuleList):
                for block in module:
                    if getattr(block, "_vlmkit_checkpointed", False):
                        continue
                    original = block.forward

                    def forward(*args, _f=original, **kwargs):  # noqa: ANN002, ANN003
                        if torch.is_grad_enabled():
                            return checkpoint(_f, *args, use_reentrant=False, **kwargs)
                        return _f(*args, **kwargs)

                    block.forward = forward
                    block._vlmkit_checkpointed = True


def merge_lora(model: Any) -> None:
    """Fold every LoRA adapter into its base Linear and put the plain layer back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for slot in SLOTS:
        module = getattr(model, slot)
        for name, sub in list(module.named_modules()):
            if isinstance(sub, BaseTunerLayer):
                sub.merge(safe_merge=True)
                parent_name, _, child = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, child, sub.get_base_layer())


def lora_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Slot-prefixed LoRA tensors (peft's names, adapter name dropped): ``backbone.layers.0....lora_A.weight``."""
    from peft import get_peft_model_state_dict

    out = {}
    for slot in SLOTS:
        module = getattr(model, slot)
        if any("lora_" in n for n, _ in module.named_parameters()):
            for key, value in get_peft_model_state_dict(module, adapter_name=ADAPTER).items():
                out[f"{slot}.{key}"] = value
    return out
