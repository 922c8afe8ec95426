"""Interop: a vlmkit model plus vlmkit's collator train under transformers' Trainer (the loss falls)."""

from __future__ import annotations

import json
import warnings

import pytest

import vlmkit
from vlmkit.train import Collator, load_rows, trainer_model

from ..unit._train_tiny import write_digits, write_model_yaml

pytestmark = pytest.mark.slow


def test_transformers_trainer_trains_a_vlmkit_model(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    files = write_digits(tmp_path / "digits", train_rows=32, heldout_rows=1)
    model = vlmkit.build(write_model_yaml(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = vlmkit.load_processor(spec=model.spec)
    rows, root = load_rows(str(files["train"]))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, max_steps=12, learning_rate=3e-3,
        logging_steps=1, report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=trainer_model(model), args=args, train_dataset=rows,
                                   data_collator=Collator(processor, image_root=root, do_image_splitting=False))  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("Trainer losses:", [round(x, 3) for x in losses])
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3  # 10.4 -> 8.6 nats
    assert json.dumps(trainer.state.log_history)  # plain data, as Trainer callbacks expect
