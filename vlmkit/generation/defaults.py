"""Default stop and pad ids, read from the checkpoint's files and the backbone's params.

Nothing is hard-coded: :func:`default_stop_ids` collects ``generation_config.json``'s eos ids,
the backbone's ``eos_token_id`` and the tokenizer's ``<end_of_utterance>``;
:func:`default_pad_id` picks ``generation_config.json``'s ``pad_token_id``, the backbone's, or
the first stop id. The folder's files are read once per folder (cached).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import VlmkitError

__all__ = ["END_OF_UTTERANCE", "default_pad_id", "default_stop_ids"]

#: The chat-turn terminator of Idefics3/SmolVLM tokenizers.
END_OF_UTTERANCE = "<end_of_utterance>"


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _generation_config_ids(path: Path) -> tuple[list[int], int | None]:
    """``(eos ids, pad id)`` of the folder's ``generation_config.json`` (empty when unreadable)."""
    try:
        gen = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [], None
    if not isinstance(gen, dict):
        return [], None
    pad = gen.get("pad_token_id") if isinstance(gen.get("pad_token_id"), int) else None
    return _as_id_list(gen.get("eos_token_id")), pad


def _end_of_utterance_id(path: Path) -> int | None:
    """The id of ``<end_of_utterance>`` among the folder's ``tokenizer.json`` added tokens."""
    try:
        tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        for entry in tok.get("added_tokens", []) if isinstance(tok, dict) else []:
            if isinstance(entry, dict) and entry.get("content") == END_OF_UTTERANCE and isinstance(entry.get("id"), int):
                return entry["id"]
    except (OSError, ValueError):
        pass
    return None


@functools.lru_cache(maxsize=32)
def _folder_facts(folder: str) -> tuple[tuple[int, ...], int | None, int | None]:
    """``(generation_config eos ids, generation_config pad id, <end_of_utterance> id)`` of a folder."""
    path = Path(folder)
    eos, pad = _generation_config_ids(path)
    return tuple(eos), pad, _end_of_utterance_id(path)


def _tokenizer_folder(model: Any) -> str | None:
    spec = getattr(model, "spec", None)
    source = getattr(spec, "tokenizer", None) or (spec.weights if isinstance(getattr(spec, "weights", None), str) else None)
    return _resolve_folder(str(source)) if source else None


@functools.lru_cache(maxsize=32)
def _resolve_folder(source: str) -> str | None:
    try:
        from ..hf import resolve_config_folder

        folder, _ = resolve_config_folder(source)
    except (VlmkitError, OSError, ImportError):
        return None
    return str(folder)


def _backbone_setting(backbone: Any, key: str) -> Any:
    params = getattr(backbone, "params", None)
    value = getattr(params, key, None)
    if value is None and isinstance(getattr(params, "config", None), dict):
        value = params.config.get(key)
    return value


def _in_vocab(ids: list[int], vocab: int | None) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i >= 0 and (vocab is None or i < vocab) and i not in out:
            out.append(i)
    return out


def default_stop_ids(model: Any) -> list[int]:
    """The ids that end a row by default, in this order, without repeats: the ``eos_token_id`` of
    the checkpoint's ``generation_config.json`` (folder of ``model.spec.tokenizer``), the
    backbone's ``eos_token_id`` param and the tokenizer's ``<end_of_utterance>``. Ids outside the
    vocabulary are left out; nothing is hard-coded."""
    folder = _tokenizer_folder(model)
    gen_eos, _, eou = _folder_facts(folder) if folder else ((), None, None)
    ids = [*gen_eos, *_as_id_list(_backbone_setting(model.backbone, "eos_token_id"))]
    if eou is not None:
        ids.append(eou)
    return _in_vocab(ids, getattr(model.backbone, "vocab_size", None))


def default_pad_id(model: Any, stop_ids: Sequence[int] | None = None) -> int:
    """The id that fills rows after they stop: ``generation_config.json``'s ``pad_token_id``, else
    the backbone's ``pad_token_id``, else the first stop id (as transformers), else 0."""
    folder = _tokenizer_folder(model)
    vocab = getattr(model.backbone, "vocab_size", None)
    candidates = [
        _folder_facts(folder)[1] if folder else None,
        _backbone_setting(model.backbone, "pad_token_id"),
        *(list(stop_ids) if stop_ids is not None else default_stop_ids(model))[:1],
    ]
    for c in candidates:
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c and (vocab is None or c < vocab):
            return c
    return 0
