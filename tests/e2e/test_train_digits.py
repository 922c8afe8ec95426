"""The small digits run: examples/train-digits-tiny.yaml (a tiny random VLM, two stages, 300 steps)
on scikit-learn's real handwritten digits, from the command line; >= 90% of the 300 held-out
digits answered exactly, and `vlmkit generate` on the run folder reads a held-out digit."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml

import vlmkit

from ..unit._train_tiny import MODEL_YAML, RECIPE_YAML, TOKENIZER, write_digits

pytestmark = pytest.mark.slow


def test_digits_tiny_recipe_reads_held_out_digits(tmp_path, one_thread, capsys, monkeypatch):
    from vlmkit.cli import main

    files = write_digits(tmp_path / "digits", train_rows=None, heldout_rows=300)
    recipe = yaml.safe_load(RECIPE_YAML.read_text(encoding="utf-8"))
    model = yaml.safe_load(MODEL_YAML.read_text(encoding="utf-8"))
    model["tokenizer"] = str(TOKENIZER)  # the bundled files, without the offline fallback warning
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(model), encoding="utf-8")
    recipe.update(model=str(tmp_path / "model.yaml"), data={"train": str(files["train"]), "eval": str(files["heldout"])})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "recipe.yaml"), "--output-dir", str(run)]) == 0

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    final = evals[-1]
    print(f"held-out exact answers after {final['step']} steps: {final['eval_accuracy']:.1%} "
          f"(eval loss {final['eval_loss']:.3f}); per eval: {[round(r['eval_accuracy'], 3) for r in evals]}")  # fmt: skip
    assert final["step"] == 300 and final["eval_accuracy"] >= 0.90
    assert [r["stage"] for r in rows if r.get("stage_step") == 1] == ["align", "finetune"]
    assert (run / "loss.png").is_file()

    heldout = [json.loads(line) for line in files["heldout"].read_text().splitlines()]
    for digit in (heldout[0], heldout[1700 - 1497]):  # the first held-out digit, and README's image 1700 (a 5)
        capsys.readouterr()
        image = files["heldout"].parent / digit["images"][0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["generate", str(run), "--image", str(image), "-p", "What digit is this?", "-n", "4"]) == 0
        answer = digit["messages"][1]["content"][0]["text"]
        assert capsys.readouterr().out.strip() == answer, image
    assert digit["images"] == ["img/1700.png"] and answer == "5"
    assert torch.get_num_threads() == 1 and vlmkit.build(run).spec.tokenizer == str(run.resolve())
