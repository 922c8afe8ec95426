"""Strict value types for component params, as transformers' configs check them.

pydantic's default (lax) mode turns ``true`` into ``1``, ``"2"`` into ``2`` and ``2.0`` into
``2`` for an ``int`` field, so a typo in a config surfaces much later as a tensor-shape error.
:func:`coercion_problem` compares what the user wrote with what pydantic made of it and names
the first such coercion, and any NaN/infinity (never a valid size, rate or scale).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from .errors import short_repr

__all__ = ["coercion_problem"]


def coercion_problem(raw: dict[str, Any], params: BaseModel) -> tuple[str, str] | None:
    """``(key path, message)`` for the first value of ``raw`` that pydantic coerced across types
    (bool or str -> number, float -> int) or that is not finite; ``None`` when all are as written.
    Nested lists/tuples are compared item by item; free-form dict params are checked for NaN only."""
    found = _nonfinite_in(raw, "")  # also in keys a validator folds into others (rope_parameters)
    if found:
        return found
    for key, value in raw.items():
        if key not in type(params).model_fields:
            continue
        found = _compare(value, getattr(params, key, None), str(key))
        if found:
            return found
    return None


def _compare(written: Any, made: Any, path: str) -> tuple[str, str] | None:
    if isinstance(written, float) and not math.isfinite(written):
        return path, f"{written!r} is not a usable number (NaN/infinity)"
    if isinstance(written, bool):
        if isinstance(made, (int, float)) and not isinstance(made, bool):
            return path, f"expected a number, got the boolean {str(written).lower()} (booleans are not numbers here)"
        return None
    if isinstance(written, str) and isinstance(made, (int, float)) and not isinstance(made, bool):
        return path, f"expected a number, got the string {short_repr(written)} (write it without quotes)"
    if isinstance(written, float) and isinstance(made, int) and not isinstance(made, bool):
        return path, f"expected an integer, got {written!r} (write it without a decimal point)"
    if isinstance(written, (list, tuple)) and isinstance(made, (list, tuple)) and len(written) == len(made):
        for i, (w, m) in enumerate(zip(written, made)):
            found = _compare(w, m, f"{path}.{i}")
            if found:
                return found
    return None


def _nonfinite_in(mapping: dict, path: str, depth: int = 0) -> tuple[str, str] | None:
    for key, value in mapping.items():
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            return where, f"{value!r} is not a usable number (NaN/infinity)"
        if isinstance(value, (list, tuple)) and depth < 8:
            found = _nonfinite_in(dict(enumerate(value)), where, depth + 1)
            if found:
                return found
        if isinstance(value, dict) and depth < 8:
            found = _nonfinite_in(value, where, depth + 1)
            if found:
                return found
    return None
