"""Two processes x batch B == one process x batch 2B (accelerate launch, gloo on CPU): the same
losses and final weights within 1e-5, with gradient accumulation, two stages and LoRA, on rows
whose answers differ in length (the loss is averaged over all answer tokens of the step).

The vision tower stays frozen here: its attention key bias has an exactly-zero true gradient
(softmax ignores a per-query constant), so it only ever gets rounding noise, and AdamW's
normalisation turns noise of either sign into lr-sized steps: no two summation orders agree on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..unit._train_tiny import recipe, write_digits, write_model_yaml

pytestmark = pytest.mark.slow


def _vary_answers(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 3 == 0:  # some answers are a few tokens longer
            answer = row["messages"][1]["content"][0]
            answer["text"] = f"It is the digit {answer['text']}."
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _recipe(tmp_path, model, train, batch_size: int, out: str) -> Path:
    r = recipe(tmp_path, model, train, batch_size=batch_size, grad_accum=2, output_dir=str(tmp_path / out))
    r["stages"] = [{"name": "align", "train": ["connector", "backbone"], "steps": 2, "lr": 3e-3},
                   {"name": "tune", "train": ["connector"], "lora": {"slots": ["backbone"], "r": 4},
                    "steps": 2, "lr": 1e-3}]  # fmt: skip
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stderr


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    files = write_digits(tmp_path / "digits", train_rows=24, heldout_rows=1)
    _vary_answers(files["train"])
    model = write_model_yaml(tmp_path)
    one = _recipe(tmp_path, model, files["train"], batch_size=4, out="one")
    two = _recipe(tmp_path, model, files["train"], batch_size=2, out="two")
    _run([sys.executable, "-m", "vlmkit", "train", str(one)])
    accelerate = Path(sys.executable).parent / "accelerate"
    log = _run([str(accelerate), "launch", "--num_processes", "2", "-m", "vlmkit", "train", str(two)])
    assert "relaunching with --multi_gpu, 2 processes over gloo" in log or torch.cuda.device_count() > 1

    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    print("losses 1 process x 4:", a, "\nlosses 2 processes x 2:", b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    wa, wb = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"largest weight difference: {worst:.2e}")
    assert worst < 1e-5
