"""Default stop and pad ids: the checkpoint's own answer, else the backbone's params.

Nothing is hard-coded. With a tokenizer folder (``model.spec.tokenizer``, else its weights
folder) the ids are the ones the processor uses, resolved once per folder by
:func:`vlmkit.processor.checks.special_ids` (generation_config.json, config.json, the
tokenizer and the family's turn-end tokens). Without one, the backbone's ``eos_token_id`` /
``pad_token_id`` params decide.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from ..errors import VlmkitError

__all__ = ["context_length", "default_pad_id", "default_stop_ids"]


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _checkpoint_ids(model: Any):
    """The :class:`~vlmkit.processor.checks.SpecialIds` of the model's tokenizer folder, or None."""
    spec = getattr(model, "spec", None)
    source = getattr(spec, "tokenizer", None) or (spec.weights if isinstance(getattr(spec, "weights", None), str) else None)
    return _ids_of_source(str(source)) if source else None


@functools.lru_cache(maxsize=32)
def _ids_of_source(source: str):
    from ..hf import resolve_config_folder
    from ..processor.checks import special_ids

    try:
        folder, _ = resolve_config_folder(source)
        if not (folder / "tokenizer.json").is_file():
            return None
        return special_ids(str(folder))
    except (VlmkitError, OSError, ImportError):
        return None


def _backbone_setting(backbone: Any, key: str) -> Any:
    params = getattr(backbone, "params", None)
    value = getattr(params, key, None)
    if value is None and isinstance(getattr(params, "config", None), dict):
        value = params.config.get(key)
    return value


def _in_vocab(ids: Sequence[int], vocab: int | None) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i >= 0 and (vocab is None or i < vocab) and i not in out:
            out.append(i)
    return out


def default_stop_ids(model: Any) -> list[int]:
    """The ids that end a row by default: the checkpoint's eos ids (the processor's
    ``eos_token_ids``) when the model has a tokenizer folder, else the backbone's
    ``eos_token_id`` param. Ids outside the vocabulary are left out."""
    found = _checkpoint_ids(model)
    ids = list(found.eos_token_ids) if found is not None else _as_id_list(_backbone_setting(model.backbone, "eos_token_id"))
    return _in_vocab(ids, getattr(model.backbone, "vocab_size", None))


def default_pad_id(model: Any, stop_ids: Sequence[int] | None = None) -> int:
    """The id that fills rows after they stop: the checkpoint's pad id, else the backbone's
    ``pad_token_id``, else the first stop id (as transformers), else 0."""
    found = _checkpoint_ids(model)
    vocab = getattr(model.backbone, "vocab_size", None)
    candidates = [
        found.pad_token_id if found is not None else None,
        _backbone_setting(model.backbone, "pad_token_id"),
        *(list(stop_ids) if stop_ids is not None else default_stop_ids(model))[:1],
    ]
    for c in candidates:
        if isinstance(c, int) and not isinstance(c, bool) and 0 <= c and (vocab is None or c < vocab):
            return c
    return 0


def context_length(backbone: Any) -> int | None:
    """The most positions ``backbone`` takes: its ``max_position_embeddings`` (its params, or its
    Hugging Face config), or None when the backbone does not say."""
    value = _backbone_setting(backbone, "max_position_embeddings")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None
