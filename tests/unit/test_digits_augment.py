"""The digits recipe's augmentation: shifted copies of training digits only, seeded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlmkit.recipes.digits import HELDOUT, shifted, write_digits_vqa


def test_shifted_moves_pixels_and_fills_with_zero():
    x = np.arange(1, 10, dtype=np.uint8).reshape(3, 3)
    assert shifted(x, 1, 0).tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
    assert shifted(x, 0, -1).tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]
    assert shifted(x, -1, 1).tolist() == [[0, 4, 5], [0, 7, 8], [0, 0, 0]]


def test_augment_adds_shifted_copies_of_training_digits_only(tmp_path):
    plain = write_digits_vqa(tmp_path / "a", train_rows=20, heldout_rows=5)
    aug = write_digits_vqa(tmp_path / "b", train_rows=20, heldout_rows=5, augment=2)
    rows = [json.loads(x) for x in aug["train"].read_text().splitlines()]
    assert len(rows) == 20 * 3
    assert aug["heldout"].read_text() == plain["heldout"].read_text()  # never augmented
    first = np.asarray(Image.open(tmp_path / "b" / rows[0]["images"][0]))
    for row in rows[20:22]:  # image 0's two copies: one pixel away, same label
        assert row["messages"][1] == rows[0]["messages"][1]
        copy = np.asarray(Image.open(tmp_path / "b" / row["images"][0]))
        assert any((copy == shifted(first, dy, dx)).all() for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
    again = write_digits_vqa(tmp_path / "c", train_rows=20, heldout_rows=5, augment=2)
    for a, b in zip(rows[20:], [json.loads(x) for x in again["train"].read_text().splitlines()][20:]):
        assert (np.asarray(Image.open(tmp_path / "b" / a["images"][0])) == np.asarray(Image.open(tmp_path / "c" / b["images"][0]))).all()
    assert HELDOUT == 300


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_augment_must_be_a_count(tmp_path, bad):
    with pytest.raises(ValueError, match="augment must be a whole number"):
        write_digits_vqa(tmp_path, augment=bad)
