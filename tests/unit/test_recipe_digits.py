"""vlmkit.recipes.digits: the rows the README's main job and examples/train-digits-tiny.yaml read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")


def test_digits_cli_writes_the_split_the_recipe_reads(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vlmkit.recipes.digits", str(tmp_path / "d")],
                          capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    assert done.stdout.split() == ["train:", str(tmp_path / "d" / "train.jsonl"), "heldout:", str(tmp_path / "d" / "heldout.jsonl")]
    train = [json.loads(x) for x in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(x) for x in (tmp_path / "d" / "heldout.jsonl").read_text().splitlines()]
    assert (len(train), len(heldout)) == (1497, 300)
    assert heldout[1700 - 1497]["images"] == ["img/1700.png"]
    assert heldout[1700 - 1497]["messages"][1]["content"][0]["text"] == "5"  # README: image 1700 is a 5
    assert not {r["images"][0] for r in train} & {r["images"][0] for r in heldout}
    assert len(list((tmp_path / "d" / "img").glob("*.png"))) == 1797


def test_digits_cli_needs_a_folder():
    done = subprocess.run([sys.executable, "-m", "vlmkit.recipes.digits"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "folder" in done.stderr
