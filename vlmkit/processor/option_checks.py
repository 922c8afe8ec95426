"""Value checks for the processor's keywords: each takes the user's value and returns it normalized,
or raises :class:`ProcessorError` naming the keyword, the value and the valid choices.

The table of keywords (:mod:`vlmkit.processor.options`) points at these functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ProcessorError, short_repr

__all__ = [
    "as_bool",
    "as_device",
    "as_factor",
    "as_longest_edge",
    "as_padding",
    "as_padding_side",
    "as_positive_int",
    "as_resample",
    "as_return_tensors",
    "as_triple",
    "as_truncation",
    "optional",
]


def _bad(name: str, value: Any, expected: str, hint: str | None = None) -> ProcessorError:
    return ProcessorError(f"{name}={short_repr(value)} is not valid: expected {expected}", hint=hint)


def optional(check):
    """``check`` that lets ``None`` through (the keyword's default)."""

    def run(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return run


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _bad(name, value, "True or False")


def as_positive_int(name: str, value: Any) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value)
    raise _bad(name, value, "a positive integer")


def as_factor(name: str, value: Any) -> float:
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value) and value > 0:
        return float(value)
    raise _bad(name, value, "a positive finite number (1/255 maps uint8 to 0-1)")


def as_triple(name: str, value: Any) -> tuple[float, float, float]:
    """One number or three (one per RGB channel); ``image_std`` must be positive."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        value = [value] * 3
    ok = isinstance(value, Sequence) and len(value) == 3
    number = (int, float, np.number)
    ok = ok and all(isinstance(v, number) and not isinstance(v, bool) and np.isfinite(v) for v in value)
    if not ok or (name == "image_std" and any(v <= 0 for v in value)):
        positive = ", all > 0" if name == "image_std" else ""
        raise _bad(name, value, f"one finite number or three (one per RGB channel){positive}")
    return (float(value[0]), float(value[1]), float(value[2]))


def as_resample(name: str, value: Any) -> int:
    """A Pillow resampling filter: ``PIL.Image.Resampling`` member or its int (0-5)."""
    choices = {int(r): r.name for r in Image.Resampling}
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value) in choices:
        return int(value)
    listed = ", ".join(f"{k} ({v})" for k, v in sorted(choices.items()))
    raise _bad(name, value, f"a PIL.Image.Resampling filter: {listed}")


def as_longest_edge(name: str, value: Any) -> int:
    """``size`` / ``max_image_size`` as transformers gives it: ``{"longest_edge": N}``."""
    if isinstance(value, Mapping) and set(value) == {"longest_edge"}:
        return as_positive_int(f"{name}['longest_edge']", value["longest_edge"])
    raise _bad(
        name,
        value,
        "{'longest_edge': <positive int>}",
        hint="tiled image processors size images by their longest edge; height/width or shortest_edge sizes do not apply",
    )


def as_device(name: str, value: Any) -> Any:
    """A ``torch.device`` or a string torch accepts (``'cpu'``, ``'cuda:0'``)."""
    import torch

    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise _bad(name, value, "a torch device such as 'cpu' or 'cuda:0'") from exc


def as_return_tensors(name: str, value: Any) -> str | None:
    if value is None or value in ("pt", "np"):
        return value
    raise _bad(name, value, "'pt' (torch tensors), 'np' (numpy arrays) or None (lists)")


#: padding values and what they mean (transformers' PaddingStrategy names included).
PADDING = {True: "longest", "longest": "longest", False: "none", "do_not_pad": "none", "max_length": "max_length"}

#: truncation values: vlmkit tokenizes single sequences, so every truncating strategy cuts that sequence.
TRUNCATION = {True: True, "longest_first": True, "only_first": True, False: False, "do_not_truncate": False}


def _enum_value(value: Any) -> Any:
    """transformers' PaddingStrategy / TruncationStrategy are str enums: use their value."""
    return getattr(value, "value", value) if not isinstance(value, (bool, str)) else value


def as_padding(name: str, value: Any) -> str:
    """``'longest'``, ``'max_length'`` or ``'none'``."""
    value = _enum_value(value)
    if isinstance(value, (bool, str)) and value in PADDING:
        return PADDING[value]
    raise _bad(name, value, "True / 'longest', 'max_length' (with max_length=N), or False / 'do_not_pad'")


def as_truncation(name: str, value: Any) -> bool:
    value = _enum_value(value)
    if isinstance(value, (bool, str)) and value in TRUNCATION:
        return TRUNCATION[value]
    if value == "only_second":
        raise ProcessorError(
            "truncation='only_second' truncates the second text of a pair; the processor takes single prompts",
            hint="use truncation=True (or 'longest_first') with max_length=N",
        )
    raise _bad(name, value, "True / 'longest_first' / 'only_first' (with max_length=N), or False / 'do_not_truncate'")


def as_padding_side(name: str, value: Any) -> str:
    if value in ("left", "right"):
        return value
    raise _bad(name, value, "'left' or 'right'")
