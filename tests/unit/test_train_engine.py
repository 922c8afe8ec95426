"""The training engine on a tiny model: the run folder, resume identity, NaN stop, bad inputs, LoRA."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

import vlmkit
from vlmkit.errors import RecipeError, TrainingError
from vlmkit.train import engine

from ._train_tiny import recipe, write_digits, write_model_yaml  # noqa: F401


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits"), train_rows=32, heldout_rows=8)


@pytest.fixture
def model_yaml(tmp_path):
    return write_model_yaml(tmp_path)


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_run_folder_is_a_model_folder_everywhere(tmp_path, model_yaml, data, one_thread, capsys, monkeypatch):
    from vlmkit.cli import main

    r = recipe(tmp_path, model_yaml, data["train"], steps=3, data={"eval": str(data["heldout"])})
    run = vlmkit.train(r)
    assert {p.name for p in run.iterdir()} >= {"vlmkit.yaml", "model.safetensors", "tokenizer.json", "recipe.yaml",
                                               "metrics.jsonl", "preprocessor_config.json", "checkpoints"}  # fmt: skip
    spec = yaml.safe_load((run / "vlmkit.yaml").read_text())
    assert (spec["weights"], spec["tokenizer"]) == (".", ".")
    assert len(_losses(run)) == 3
    moved = tmp_path / "moved"  # relative sources: the folder works wherever it goes
    shutil.copytree(run, moved)
    a, b = vlmkit.build(moved), vlmkit.build_from_hf(moved)
    assert a.load_report.ok and not a.untrained_parameters()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    torch.manual_seed(0)
    fresh = vlmkit.build(model_yaml)
    assert not torch.equal(fresh.connector.proj.weight, a.connector.proj.weight)  # it trained
    proc = vlmkit.load_processor(moved)
    assert (proc.settings.tile, proc.image_seq_len, proc.settings.do_image_splitting) == (32, 4, False)
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert main(["inspect", str(moved)]) == 0
    assert "navit" in capsys.readouterr().out
    img = data["train"].parent / "img" / "0000.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["generate", str(moved), "--image", str(img), "-p", "What digit is this?", "-n", "3"]) == 0


def _two_stage(tmp_path, model_yaml, data, **extra) -> dict:
    r = recipe(tmp_path, model_yaml, data["train"], batch_size=2, grad_accum=2, save_every=2, **extra)
    r["stages"] = [{"name": "align", "train": ["connector"], "steps": 3, "lr": 3e-3},
                   {"name": "tune", "train": ["vision_tower"], "lora": {"slots": ["backbone"], "r": 4, "dropout": 0.1},
                    "steps": 4, "lr": 1e-3, "warmup_steps": 1, "schedule": "cosine"}]  # fmt: skip
    return r


@pytest.mark.slow
def test_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, model_yaml, data, one_thread, monkeypatch):
    whole = vlmkit.train(_two_stage(tmp_path, model_yaml, data), output_dir=tmp_path / "whole")
    step = engine.Run._step

    def crash_at_step_6(self, wrapped, optimizer, micro, params, state, stage):
        if state["step"] == 5:  # after the checkpoint of step 4, in the LoRA stage (dropout draws RNG)
            raise KeyboardInterrupt
        return step(self, wrapped, optimizer, micro, params, state, stage)

    monkeypatch.setattr(engine.Run, "_step", crash_at_step_6)
    r = _two_stage(tmp_path, model_yaml, data)
    with pytest.raises(KeyboardInterrupt):
        vlmkit.train(r, output_dir=tmp_path / "cut")
    assert (tmp_path / "cut/checkpoints/latest").read_text().strip() == "step-00000004"
    assert not (tmp_path / "cut/vlmkit.yaml").exists()
    monkeypatch.setattr(engine.Run, "_step", step)
    with pytest.raises(TrainingError, match="already holds a run"):
        vlmkit.train(r, output_dir=tmp_path / "cut")
    resumed = vlmkit.train(r, output_dir=tmp_path / "cut", resume=True)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(whole) == _losses(resumed) and len(_losses(whole)) == 7


@pytest.mark.slow
def test_resume_of_another_spec_or_without_checkpoint_is_refused(tmp_path, model_yaml, data, one_thread):
    r = recipe(tmp_path, model_yaml, data["train"], steps=2, save_every=1)
    with pytest.raises(TrainingError, match="nothing to resume"):
        vlmkit.train(r, resume=True)
    vlmkit.train(r)
    other = write_model_yaml(tmp_path / "other", hidden_size=32, intermediate_size=64) if (tmp_path / "other").mkdir() is None else None
    with pytest.raises(TrainingError, match="checkpoint of another run: its model spec differ"):
        vlmkit.train({**r, "model": str(other)}, resume=True)
    with pytest.raises(TrainingError, match="its stages, data, batch size or seed differ"):
        vlmkit.train({**r, "seed": 1}, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, model_yaml, data, one_thread, monkeypatch):
    forward, calls = engine.TokenLoss.forward, []

    def nan_at_step_3(self, *args, **kwargs):
        loss, n, exact = forward(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), n, exact

    monkeypatch.setattr(engine.TokenLoss, "forward", nan_at_step_3)
    r = recipe(tmp_path, model_yaml, data["train"], steps=5, save_every=2)
    with pytest.raises(TrainingError, match=r"the loss is nan at step 3 .*stage 'all'") as info:
        vlmkit.train(r)
    assert "step-00000002" in str(info.value)
    run = tmp_path / "run"
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000002"
    assert not (run / "vlmkit.yaml").exists() and not (run / "model.safetensors").exists()
    monkeypatch.setattr(engine.TokenLoss, "forward", forward)
    assert vlmkit.train(r, resume=True) == run  # the good checkpoint resumes


def test_bad_model_and_lora_inputs(tmp_path, data, one_thread, capsys):
    from vlmkit.cli import main

    small_vocab = write_model_yaml(tmp_path, vocab_size=49200)
    with pytest.raises(TrainingError, match="the tokenizer has 49280 ids but the backbone's vocabulary .* is 49200"):
        vlmkit.train(recipe(tmp_path, small_vocab, data["train"]))
    model = write_model_yaml(tmp_path / "m") if (tmp_path / "m").mkdir() is None else None
    no_linear = recipe(tmp_path, model, data["train"], stage={"train": [], "lora": {"slots": ["aligner"]}})
    with pytest.raises(RecipeError, match="LoRA on slot 'aligner' matches no Linear layer") as info:
        vlmkit.train(no_linear)
    assert info.value.key_path == "stages.0.lora"
    wrong = recipe(tmp_path, model, data["train"], stage={"lora": {"slots": ["connector"], "target_modules": ["q_proj"]},
                                                          "train": ["backbone"]})  # fmt: skip
    with pytest.raises(RecipeError, match=r"matches no Linear layer \(target_modules \['q_proj'\]\).*: proj"):
        vlmkit.train(wrong)
    assert not (tmp_path / "run").exists()  # nothing half-written
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, model, data["train"], stage={"train": ["tower"]})))
    assert main(["train", str(path)]) == 1
    assert "stages.0.train: unknown slot 'tower'" in capsys.readouterr().err


@pytest.mark.slow
def test_save_adapter_keeps_lora_separate_and_apply_adapter_restores_it(tmp_path, model_yaml, data, one_thread):
    r = recipe(tmp_path, model_yaml, data["train"], steps=3, stage={"train": ["connector"], "lora": {"slots": ["backbone"]}})
    merged = vlmkit.build(vlmkit.train(r, output_dir=tmp_path / "merged"))
    sep = vlmkit.train(r, output_dir=tmp_path / "sep", save_adapter=True)
    assert (sep / "adapter/adapter_model.safetensors").is_file()
    base = vlmkit.build(sep)
    torch.manual_seed(0)
    fresh = vlmkit.build(model_yaml)
    assert torch.equal(base.backbone.layers[0].mlp.down_proj.weight, fresh.backbone.layers[0].mlp.down_proj.weight)
    adapted = vlmkit.train.apply_adapter(base, sep).eval()
    ids = torch.tensor([[1, 200, 300, 400]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(fresh(ids).logits, merged(ids).logits, atol=1e-4)
