"""Training recipes: validation, clear errors naming the key, the JSON schema, the example recipe."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

import vlmkit
from vlmkit.errors import RecipeError
from vlmkit.train import TrainRecipe, load_recipe

from ._train_tiny import RECIPE_YAML

BASE = {"model": "m.yaml", "data": {"train": "t.jsonl"}, "output_dir": "runs/x",
        "stages": [{"name": "align", "train": ["connector"], "steps": 3, "lr": 1e-3}]}  # fmt: skip


def _with_stage(**stage) -> dict:
    return {**BASE, "stages": [{**BASE["stages"][0], **stage}]}


def test_the_issue_recipe_validates_with_trainer_defaults():
    recipe, origin = load_recipe({**BASE, "stages": [
        {"name": "align", "train": ["connector"], "steps": 300, "lr": 1.0e-3},
        {"name": "finetune", "train": ["connector", "vision_tower"], "lora": {"slots": ["backbone"], "r": 8, "alpha": 16},
         "steps": 300, "lr": 2.0e-4}]})  # fmt: skip
    assert origin is None and isinstance(recipe, TrainRecipe)
    assert recipe.stages[1].lora.r == 8 and recipe.stages[1].lora.dropout == 0.0
    # transformers.TrainingArguments defaults: linear decay, no warmup, no weight decay, clip 1.0, seed 42
    assert (recipe.stages[0].schedule, recipe.stages[0].warmup_steps, recipe.stages[0].weight_decay) == ("linear", 0, 0.0)
    assert (recipe.max_grad_norm, recipe.seed, recipe.grad_accum, recipe.save_every) == (1.0, 42, 1, 500)
    assert vlmkit.TrainRecipe is TrainRecipe and callable(vlmkit.train)


@pytest.mark.parametrize(
    ("data", "key_path", "words"),
    [
        ({**BASE, "epochs": 3}, "epochs", "unknown key"),
        (_with_stage(stpes=1), "stages.0.stpes", "Did you mean 'steps'"),
        (_with_stage(train=["tower"]), "stages.0.train", "unknown slot 'tower'"),
        (_with_stage(lora={"slots": ["backbon"]}), "stages.0.lora.slots", "Did you mean 'backbone'"),
        (_with_stage(lora={"slots": ["connector"]}), "stages.0", "both fully trained and LoRA-adapted"),
        (_with_stage(train=[]), "stages.0", "nothing trains in this stage"),
        (_with_stage(steps=0), "stages.0.steps", "greater than 0"),
        (_with_stage(warmup_steps=9), "stages.0", "warmup_steps 9 is more than steps 3"),
        ({**BASE, "stages": []}, "stages", "at least 1"),
        ({**BASE, "stages": [BASE["stages"][0]] * 2}, None, "repeated: align"),
        ({**BASE, "precision": "int4"}, "precision", "'fp32', 'bf16' or 'fp16'"),
        ({k: v for k, v in BASE.items() if k != "model"}, "model", "Field required"),
    ],
)
def test_bad_recipes_name_the_key(data, key_path, words):
    with pytest.raises(RecipeError) as info:
        load_recipe(data)
    assert info.value.key_path == key_path, str(info.value)
    assert words in str(info.value)


def test_recipe_file_errors_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "batch": 8}), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"r\.yaml: batch: unknown key.*Did you mean 'batch_size'"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe(tmp_path / "absent.yaml")
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        load_recipe(path)


def test_json_schema_accepts_the_example_recipe_and_rejects_unknown_keys():
    schema = vlmkit.train.json_schema()
    example = yaml.safe_load(RECIPE_YAML.read_text(encoding="utf-8"))
    jsonschema.validate(example, schema)
    load_recipe(RECIPE_YAML)  # and pydantic agrees
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**example, "epochs": 1}, schema)
