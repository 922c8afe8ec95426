"""Training: align a swapped tower and fine-tune, from a YAML recipe, on one CPU or many processes.

``vlmkit.train(recipe)`` (this package is callable) and ``vlmkit train RECIPE.yaml`` run a
:class:`TrainRecipe`; see docs/training.md. The pieces are usable on their own: :class:`Collator`
(rows -> inputs with answer-only labels, also a transformers ``Trainer`` data collator),
:func:`load_rows`, :class:`TokenLoss`, :func:`trainer_model` and :func:`apply_adapter`.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

from .collator import IGNORE_INDEX, Collator
from .data import load_rows
from .engine import TokenLoss
from .output import apply_adapter
from .recipe import DataSpec, LoraSpec, StageSpec, TrainRecipe, json_schema, load_recipe
from .trainer import trainer_model

__all__ = ["train", "TrainRecipe", "StageSpec", "LoraSpec", "DataSpec", "json_schema", "load_recipe", "Collator",
           "IGNORE_INDEX", "load_rows", "TokenLoss", "trainer_model", "apply_adapter"]  # fmt: skip


def train(
    recipe: str | os.PathLike | dict | TrainRecipe,
    *,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    save_adapter: bool | None = None,
    train_data: Any = None,
    eval_data: Any = None,
) -> Path:
    """Run ``recipe`` (a YAML path, its dict form or a :class:`TrainRecipe`); returns the run folder.

    ``output_dir`` / ``save_adapter`` override the recipe's; ``resume`` continues from the run
    folder's latest checkpoint. ``train_data`` / ``eval_data`` may be ``datasets.Dataset`` s with
    ``images`` and ``messages`` columns, used instead of the recipe's JSONL files (image paths
    relative to the working directory). Every problem is a :class:`~vlmkit.errors.VlmkitError`.
    """
    from .engine import run

    recipe, _ = load_recipe(recipe)
    updates: dict[str, Any] = {}
    if output_dir is not None:
        updates["output_dir"] = os.fspath(output_dir)
    if save_adapter is not None:
        updates["save_adapter"] = bool(save_adapter)
    if updates:
        recipe = TrainRecipe.model_validate({**recipe.model_dump(), **updates})
    data = {k: v for k, v in (("train", train_data), ("eval", eval_data)) if v is not None}
    return run(recipe, Path(recipe.output_dir), resume=resume, data=data)


class _CallableModule(types.ModuleType):
    """``vlmkit.train(...)`` calls :func:`train`; ``vlmkit.train.json_schema()`` etc. still work."""

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
