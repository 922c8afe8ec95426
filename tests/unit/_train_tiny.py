"""Tiny models and real data for the training tests (not a test module).

The tokenizer, chat template and image settings are SmolVLM-256M-Instruct's published files
(bundled with vlmkit); the model is configs/digits-tiny.yaml (a tiny random VLM with that
vocabulary: a 1-layer navit tower on 32x32 images, 4 visual tokens per image, a 2-layer Llama),
optionally made smaller. The data are scikit-learn's handwritten digits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ..conftest import REPO, published_folder

TOKENIZER = published_folder("SmolVLM-256M-Instruct")
MODEL_YAML = REPO / "configs" / "digits-tiny.yaml"
RECIPE_YAML = REPO / "examples" / "train-digits-tiny.yaml"


def tiny_spec(**backbone) -> dict:
    """configs/digits-tiny.yaml as a dict, tokenizer pointed at the bundled files, backbone keys updated."""
    spec = yaml.safe_load(MODEL_YAML.read_text(encoding="utf-8"))
    spec["tokenizer"] = str(TOKENIZER)
    spec["backbone"].update(backbone)
    return spec


def write_model_yaml(folder: Path, **backbone) -> Path:
    path = Path(folder) / "tiny-model.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(**backbone), sort_keys=False), encoding="utf-8")
    return path


def write_digits(folder: Path, train_rows: int | None = 64, heldout_rows: int = 16) -> dict[str, Path]:
    pytest.importorskip("sklearn")
    from vlmkit.recipes.digits import write_digits_vqa

    return write_digits_vqa(folder, train_rows=train_rows, heldout_rows=heldout_rows)


def recipe(folder: Path, model: Path, train: Path, *, steps: int = 4, batch_size: int = 4, **extra) -> dict:
    """A one-stage recipe training every slot, written to ``folder/run``."""
    stage = {"name": "all", "train": ["vision_tower", "connector", "backbone"], "steps": steps, "lr": 1e-3}
    stage.update(extra.pop("stage", {}))
    return {"model": str(model), "data": {"train": str(train), **extra.pop("data", {})}, "stages": [stage],
            "batch_size": batch_size, "seed": 0, "output_dir": str(Path(folder) / "run"),
            "image_splitting": False, "save_every": None, **extra}  # fmt: skip


