"""scikit-learn's handwritten digits (1,797 real 8x8 scans shipped inside scikit-learn) as VQA rows.

``write_digits_vqa(folder)`` writes ``folder/img/NNNN.png`` and two JSONL files of the training
row format (docs/training.md), one question per image, "What digit is this?" -> "7":
``train.jsonl`` (images 0 .. 1496) and ``heldout.jsonl`` (the fixed last 300, never trained on).

From a shell: ``python -m vlmkit.recipes.digits data/digits`` (what examples/train-digits-tiny.yaml reads).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["QUESTION", "HELDOUT", "write_digits_vqa", "digit_row", "shifted"]

QUESTION = "What digit is this?"
#: The held-out split: the last 300 of the 1,797 digits.
HELDOUT = 300


def digit_row(image: str, answer: str, question: str = QUESTION) -> dict:
    """One training row: an image and its question, then the answer."""
    return {"images": [image], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}  # fmt: skip


def shifted(pixels, dy: int, dx: int):  # noqa: ANN001, ANN201 - numpy in, numpy out
    """``(H, W)`` pixels moved ``dy`` rows down and ``dx`` columns right; what moves in is 0 (paper)."""
    import numpy as np

    out = np.zeros_like(pixels)
    h, w = pixels.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = pixels[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out


def write_digits_vqa(folder: str | Path, *, train_rows: int | None = None, heldout_rows: int = HELDOUT,
                     augment: int = 0, seed: int = 0) -> dict[str, Path]:  # fmt: skip
    """Write the PNGs and ``train.jsonl`` / ``heldout.jsonl``; returns their paths by split.

    ``train_rows`` keeps only the first rows of the training split (``None``: all 1,497);
    ``heldout_rows`` the first rows of the held-out split. ``augment`` adds that many copies of
    each training image, each moved by one pixel in a random direction (seeded by ``seed``;
    ``img/aug/NNNN-k.png``); the held-out split is never augmented.
    """
    if not isinstance(augment, int) or isinstance(augment, bool) or augment < 0:
        raise ValueError(f"augment must be a whole number of copies >= 0, not {augment!r}")
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    splits = {"train": range(0, n - HELDOUT), "heldout": range(n - HELDOUT, n)}
    limits = {"train": train_rows, "heldout": heldout_rows}
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    out = {}
    for name, indices in splits.items():
        indices = list(indices)[: limits[name]] if limits[name] is not None else list(indices)
        lines = []
        for i in indices:
            png = folder / "img" / f"{i:04d}.png"
            if not png.exists():
                pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255 grey
                Image.fromarray(pixels, mode="L").save(png)
            lines.append(json.dumps(digit_row(f"img/{png.name}", str(int(digits.target[i])))))
        if name == "train" and augment:
            lines += _augmented_rows(folder, digits, indices, augment, seed)
        out[name] = folder / f"{name}.jsonl"
        out[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _augmented_rows(folder: Path, digits, indices: list[int], copies: int, seed: int) -> list[str]:  # noqa: ANN001
    import numpy as np
    from PIL import Image

    moves = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    rng = np.random.default_rng(seed)
    (folder / "img" / "aug").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in indices:
        pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
        for k in range(copies):
            dy, dx = moves[int(rng.integers(len(moves)))]
            png = folder / "img" / "aug" / f"{i:04d}-{k}.png"
            Image.fromarray(shifted(pixels, dy, dx), mode="L").save(png)
            lines.append(json.dumps(digit_row(f"img/aug/{png.name}", str(int(digits.target[i])))))
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m vlmkit.recipes.digits FOLDER``: write the rows and images, print the file paths."""
    parser = argparse.ArgumentParser(prog="python -m vlmkit.recipes.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write img/*.png, train.jsonl and heldout.jsonl")
    args = parser.parse_args(argv)
    for split, path in write_digits_vqa(args.folder).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
