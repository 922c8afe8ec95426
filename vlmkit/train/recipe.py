"""The training recipe: a validated pydantic :class:`TrainRecipe` (unknown keys are errors).

The YAML form::

    model: configs/timm-vit-smollm2.yaml   # a model YAML, a checkpoint folder or an earlier run's output_dir
    data: {train: data/train.jsonl, eval: data/eval.jsonl}
    stages:
      - {name: align, train: [connector], steps: 300, lr: 1.0e-3}
      - {name: finetune, train: [connector, vision_tower], lora: {slots: [backbone], r: 8, alpha: 16},
         steps: 300, lr: 2.0e-4}
    batch_size: 8
    grad_accum: 1
    seed: 0
    output_dir: runs/digits

Relative paths (``model``, ``data``, ``output_dir``) are relative to the working directory, as
for every other vlmkit command; image paths in a JSONL file are relative to that file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import RecipeError, closest, short_repr
from ..protocols import SLOTS

__all__ = ["DataSpec", "LoraSpec", "StageSpec", "TrainRecipe", "load_recipe", "json_schema"]

_STRICT = ConfigDict(extra="forbid")


def _check_slots(slots: list[str], key: str) -> None:
    for slot in slots:
        if slot not in SLOTS:
            near = closest(slot, SLOTS)
            raise ValueError(f"{key}: unknown slot {slot!r}; slots are {', '.join(SLOTS)}"
                             + (f". Did you mean {near!r}?" if near else ""))  # fmt: skip


class LoraSpec(BaseModel):
    """LoRA adapters (peft) on the Linear layers of some slots; their base weights stay frozen."""

    model_config = _STRICT
    slots: list[str] = Field(min_length=1, description="Slots whose Linear layers get adapters.")
    r: int = Field(8, gt=0, description="Rank of the adapters.")
    alpha: float = Field(16.0, gt=0, description="Scale: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None, description="Names (or name suffixes) of the Linear layers to adapt; default: every Linear "
        "of the slots except the layer producing the vocabulary (the LM head).",
    )

    @model_validator(mode="after")
    def _known_slots(self) -> LoraSpec:
        _check_slots(self.slots, "slots")
        return self


class StageSpec(BaseModel):
    """One stage: which slots train, for how many optimizer steps, at which learning rate."""

    model_config = _STRICT
    name: str = Field(min_length=1)
    train: list[str] = Field(default_factory=list, description="Slots whose weights train; all others are frozen.")
    lora: LoraSpec | None = None
    steps: int = Field(gt=0, description="Optimizer steps of this stage.")
    lr: float = Field(gt=0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup (to 0).")
    weight_decay: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _consistent(self) -> StageSpec:
        _check_slots(self.train, "train")
        if self.lora is not None:
            both = sorted(set(self.train) & set(self.lora.slots))
            if both:
                raise ValueError(f"slot(s) {', '.join(both)} are both fully trained and LoRA-adapted; pick one")
        if not self.train and self.lora is None:
            raise ValueError("nothing trains in this stage: list slots in `train:` or add `lora:`")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} is more than steps {self.steps}")
        return self


class DataSpec(BaseModel):
    """Where the rows are: JSONL files (one row per line)."""

    model_config = _STRICT
    train: str = Field(min_length=1, description="JSONL file of training rows.")
    eval: str | None = Field(None, description="JSONL file of held-out rows (loss and exact-answer accuracy).")


class TrainRecipe(BaseModel):
    """A whole training run. Build one with :func:`load_recipe` (a path, a dict or a TrainRecipe)."""

    model_config = _STRICT
    model: str = Field(min_length=1, description="A model YAML, a checkpoint folder or an earlier run's output_dir.")
    data: DataSpec
    stages: list[StageSpec] = Field(min_length=1, description="Run in order, each from the previous one's weights.")
    output_dir: str = Field(min_length=1)
    batch_size: int = Field(8, gt=0, description="Rows per process per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    seed: int = Field(42, ge=0, description="Seeds the fresh init, the data order and dropout.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null for none.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate every this many steps (and at the end).")
    save_every: int | None = Field(500, gt=0, description="Checkpoint every this many steps; null for only at stage ends.")
    log_every: int = Field(10, gt=0, description="Plain progress line every this many steps (no terminal).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Mixed precision through accelerate.")
    gradient_checkpointing: bool = Field(False, description="Recompute the blocks of trained slots in backward.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes for the collator.")
    image_splitting: bool | None = Field(None, description="Split large images into tiles (default: the checkpoint's).")
    report_to: Literal["auto", "none", "tensorboard"] = Field(
        "auto", description="accelerate tracker; auto = tensorboard when installed."
    )
    save_adapter: bool = Field(False, description="Keep LoRA adapters separate instead of merging them.")

    @model_validator(mode="after")
    def _unique_names(self) -> TrainRecipe:
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dup)}")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one (the data order and the stages)."""
        return self.model_dump(mode="json", include={"stages", "batch_size", "grad_accum", "seed", "data"})


def load_recipe(source: str | os.PathLike | dict | TrainRecipe) -> tuple[TrainRecipe, str | None]:
    """``(recipe, file it came from or None)``; any problem is a :class:`RecipeError` naming the key."""
    if isinstance(source, TrainRecipe):
        return source, None
    origin = None
    if isinstance(source, (str, os.PathLike)):
        origin = os.fspath(source)
        source = _read_yaml(Path(source))
    if not isinstance(source, dict):
        raise RecipeError(f"a recipe is a mapping (YAML) of model, data, stages, output_dir...; got {short_repr(source)}",
                          source=origin, hint="see configs/train-digits.yaml; vlmkit.train.json_schema() lists every key")  # fmt: skip
    try:
        return TrainRecipe.model_validate(source), origin
    except pydantic.ValidationError as exc:
        raise _recipe_error(exc, origin) from None


def _read_yaml(path: Path) -> Any:
    from ..errors import SourceNotFoundError, SpecError
    from ..limits import read_text
    from ..yaml_safe import load

    try:
        return load(read_text(path, kind="recipe", bound="yaml_bytes"), source=str(path))
    except SourceNotFoundError as exc:
        if not path.exists():
            raise RecipeError(f"no recipe file {str(path)!r}", hint="check the path") from None
        raise RecipeError(f"cannot read recipe {str(path)!r}: {exc.message}", hint=exc.hint) from None
    except SpecError as exc:
        raise RecipeError(exc.detail, source=str(path), hint=exc.hint) from None


def _recipe_error(exc: pydantic.ValidationError, origin: str | None) -> RecipeError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        near = closest(loc[-1], allowed)
        msg = f"unknown key; valid keys here: {', '.join(allowed)}" + (f". Did you mean {near!r}?" if near else "")
    elif err["type"] != "missing" and not isinstance(err.get("input"), dict):
        msg += f" (got {short_repr(err.get('input'))})"
    if ": unknown slot" in msg:  # a slot list's validator names its own key
        key, _, msg = msg.partition(": ")
        loc.append(key)
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return RecipeError(msg + more, key_path=".".join(loc) or None, source=origin,
                       hint="fix this key; vlmkit.train.json_schema() describes every key")  # fmt: skip


def _allowed_keys(loc: list[str]) -> list[str]:
    """The keys the model at ``loc`` (``["stages", "0", "lora"]``) accepts."""
    cls: Any = TrainRecipe
    for part in loc:
        if part.isdigit():
            continue
        field = cls.model_fields.get(part)
        if field is None:
            break
        for candidate in (LoraSpec, StageSpec, DataSpec):
            if candidate.__name__ in repr(field.annotation):
                cls = candidate
                break
    return list(cls.model_fields)


def json_schema() -> dict[str, Any]:
    """The JSON schema of recipe files (draft 2020-12)."""
    schema = TrainRecipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "vlmkit training recipe"
    return schema
