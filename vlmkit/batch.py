"""``vlmkit generate --batch prompts.jsonl``: many prompts in, one JSON answer per line out, batched.

Each input line is a JSON object: ``{"prompt": "...", "images": ["a.png", ...], "id": ...}``;
``images`` (paths relative to the JSONL file's folder) and ``id`` (any JSON value, echoed back;
default: the line number) are optional, and any other key is an error. The whole file is read and
checked before the model runs. Prompts go through the chat template as one user turn each and run
``batch_size`` at a time (left-padded, one :func:`~vlmkit.generation.generate` call per batch).
Each output line is ``{"id", "prompt", "answer", "new_tokens", "finish_reason"}`` with
``finish_reason`` ``"stop"`` (a stop token) or ``"length"`` (``max_new_tokens`` reached), in the
input's order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VlmkitError

__all__ = ["BatchPrompt", "MAX_BATCH_FILE_BYTES", "read_prompts", "run_batch"]

#: Largest prompts file read (prompts only: images are separate files).
MAX_BATCH_FILE_BYTES = 64 * 1024 * 1024
KEYS = ("prompt", "images", "id")


@dataclass
class BatchPrompt:
    """One input line: ``prompt``, its image ``paths`` (resolved) and the ``id`` to echo."""

    id: Any
    prompt: str
    paths: list[Path] = field(default_factory=list)


def _fail(path: Path, line: int, what: str, hint: str) -> VlmkitError:
    return VlmkitError(f"{path}:{line}: {what}", hint=hint)


def _parse(path: Path, number: int, text: str) -> BatchPrompt:
    try:
        row = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, number, f"not a JSON object ({exc})", 'each line is {"prompt": "...", "images": [...]}') from None
    if not isinstance(row, dict):
        raise _fail(path, number, f"a JSON {type(row).__name__}, not an object", 'each line is {"prompt": "..."}')
    unknown = sorted(set(row) - set(KEYS))
    if unknown:
        raise _fail(path, number, f"unknown key(s) {unknown}", f"the keys are {list(KEYS)}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _fail(path, number, f"'prompt' must be a non-empty string; got {prompt!r}", 'e.g. {"prompt": "Describe the image."}')
    images = row.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise _fail(path, number, f"'images' must be a list of file paths; got {images!r}", 'e.g. "images": ["cat.png"]')
    paths = [(path.parent / p).expanduser() for p in images]
    for p in paths:
        if not p.is_file():
            raise _fail(path, number, f"image {str(p)!r} is not a file", "image paths are relative to the JSONL file's folder")
    return BatchPrompt(row.get("id", number), prompt, paths)


def read_prompts(path: Path) -> list[BatchPrompt]:
    """Every prompt of the JSONL file ``path`` (blank lines skipped), checked; a
    :class:`~vlmkit.errors.VlmkitError` names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise VlmkitError(f"prompts file {str(path)!r} is not a file", hint="pass a JSONL file: one JSON object per line")
    if path.stat().st_size > MAX_BATCH_FILE_BYTES:
        raise VlmkitError(f"prompts file {str(path)!r} is over {MAX_BATCH_FILE_BYTES} bytes", hint="split it into several files")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise VlmkitError(f"prompts file {str(path)!r} is not UTF-8 text ({exc})", hint="save it as UTF-8 JSONL") from None
    prompts = [_parse(path, n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not prompts:
        raise VlmkitError(f"prompts file {str(path)!r} holds no prompts", hint='add lines like {"prompt": "Hello"}')
    return prompts


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_batch(model: Any, processor: Any, prompts: list[BatchPrompt], write: Callable[[dict], None], *,
              batch_size: int, open_images: Callable[[list[Path]], list], **gen: Any) -> None:  # fmt: skip
    """Answer ``prompts`` ``batch_size`` at a time; ``write`` gets each answer's dict in order."""
    from .generation import default_stop_ids

    stops = set(default_stop_ids(model))
    for group in _chunks(prompts, batch_size):
        images = [open_images(p.paths) for p in group]
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}] * len(p.paths) + [{"type": "text", "text": p.prompt}]}],
                add_generation_prompt=True,
            )
            for p in group
        ]
        enc = processor(text=texts, images=images if any(images) else None)
        out = model.generate(**enc, **gen)
        for p, row in zip(group, out[:, enc["input_ids"].shape[1] :].tolist()):
            write(_answer(p, row, stops, processor))


def _answer(p: BatchPrompt, row: list[int], stops: set[int], processor: Any) -> dict:
    end = next((i for i, t in enumerate(row) if t in stops), None)
    tokens = row if end is None else row[:end]
    return {
        "id": p.id,
        "prompt": p.prompt,
        "answer": processor.decode(tokens, skip_special_tokens=True),
        "new_tokens": len(tokens) + (0 if end is None else 1),
        "finish_reason": "length" if end is None else "stop",
    }
