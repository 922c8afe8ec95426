"""Training rows: Hugging Face ``datasets`` from JSONL files (or a ``datasets.Dataset`` from Python).

A row is the chat format of transformers' chat templates and TRL's VLM fine-tuning::

    {"images": ["img/0001.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "7"}]}]}

Image entries are file paths (relative to the JSONL file), PIL images, or ``datasets.Image``
values (``{"bytes": ..., "path": ...}``). :func:`check_rows` validates every row before training
starts, so a bad row stops the run before anything is written.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, short_repr

__all__ = ["load_rows", "check_rows", "check_row", "open_image", "image_parts"]


def load_rows(source: Any, *, image_root: str | os.PathLike | None = None):
    """``(datasets.Dataset, image_root)`` for a JSONL path or a ``datasets.Dataset``.

    Relative image paths are resolved against ``image_root``: the JSONL file's folder by
    default, the working directory for a Dataset given without one.
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        return source, Path(image_root) if image_root is not None else Path.cwd()
    if isinstance(source, datasets.IterableDataset):
        raise DataError("a streaming datasets.IterableDataset is not supported yet: training needs random access "
                        "for a data order that resumes exactly", hint="pass a datasets.Dataset (map-style)")  # fmt: skip
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"training data must be a JSONL path or a datasets.Dataset; got {type(source).__name__} "
                        f"{short_repr(source)}", hint="pass data.train: path/to/train.jsonl")  # fmt: skip
    path = Path(source)
    if not path.is_file():
        raise DataError(f"no data file {str(path)!r}", hint="check data.train / data.eval (relative to the working directory)")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps JSON and schema problems in its own error types
        raise DataError(f"{path}: not a JSONL file of rows ({type(exc).__name__}: {short_repr(str(exc), 300)})",
                        hint="one JSON object per line with 'images' and 'messages'") from None  # fmt: skip
    finally:
        datasets.enable_progress_bars()
    return ds, Path(image_root) if image_root is not None else path.parent


def image_parts(messages: Sequence[Mapping[str, Any]]) -> int:
    """How many ``{"type": "image"}`` items the messages hold."""
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, (list, tuple)):
            count += sum(1 for item in content if isinstance(item, Mapping) and item.get("type") == "image")
    return count


def check_row(row: Mapping[str, Any], where: str) -> None:
    """Raise :class:`DataError` (naming ``where`` and the key) unless ``row`` is a usable chat row."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a row is a JSON object with 'images' and 'messages'; got {short_repr(row)}")
    messages = row.get("messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: key 'messages' must be a non-empty list of {{role, content}} objects; "
                        f"got {short_repr(messages)}", hint="see docs/training.md for the row format")  # fmt: skip
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: messages[{k}] needs a string 'role'; got {short_repr(message)}")
        content = message.get("content")
        if not isinstance(content, (str, list, tuple)):
            raise DataError(f"{where}: messages[{k}].content must be a string or a list of items; got {short_repr(content)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: key 'messages' has no assistant turn, so there is nothing to learn",
                        hint="every row needs at least one {'role': 'assistant', ...} message (the answer)")  # fmt: skip
    images = row.get("images") or []
    if not isinstance(images, (list, tuple)):
        raise DataError(f"{where}: key 'images' must be a list; got {short_repr(images)}")
    parts = image_parts(messages)
    if parts != len(images):
        raise DataError(
            f"{where}: key 'images' lists {len(images)} image(s) but 'messages' holds {parts} image part(s)",
            hint="write one {'type': 'image'} item per image, in the order of 'images'",
        )


def check_rows(ds, image_root: Path, source: str, *, open_images: bool = True) -> None:
    """:func:`check_row` on every row, and every image file opened and decoded once."""
    for i in range(len(ds)):
        row = ds[i]
        where = f"{source}: row {i}"
        check_row(row, where)
        if open_images:
            for j, entry in enumerate(row.get("images") or []):
                open_image(entry, image_root, f"{where}: images[{j}]").close()


def open_image(entry: Any, image_root: Path, where: str):
    """A fully decoded PIL image from a path (relative to ``image_root``), a PIL image or a
    ``datasets.Image`` dict; :class:`DataError` for a missing or corrupt file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(entry, Image.Image):
        return entry
    if isinstance(entry, Mapping) and entry.get("bytes") is not None:
        source, label = io.BytesIO(entry["bytes"]), "the image bytes"
    elif isinstance(entry, Mapping) and isinstance(entry.get("path"), str):
        source = label = str(Path(image_root) / entry["path"])
    elif isinstance(entry, str):
        source = label = str(Path(image_root) / entry)
    else:
        raise DataError(f"{where}: an image is a file path, a PIL image or a datasets.Image value; got {short_repr(entry)}")
    if isinstance(source, str) and not Path(source).is_file():
        raise DataError(f"{where}: image file {label!r} does not exist",
                        hint="image paths are relative to the JSONL file; check the path")  # fmt: skip
    try:
        with Image.open(source) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: {label!r} is not a readable image ({type(exc).__name__}: {exc})",
                        hint="replace the corrupt file, or drop the row") from None  # fmt: skip
