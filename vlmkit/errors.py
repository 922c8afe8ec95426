"""Errors raised by vlmkit.

Every error a user can trigger with bad input is a :class:`VlmkitError`. Messages name the
offending value, where it came from (file and key path), what was expected and what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "VlmkitError",
    "SpecError",
    "UnknownComponentError",
    "PluginError",
    "WeightLoadError",
    "PackingError",
    "SourceNotFoundError",
    "ProcessorError",
    "GenerationError",
    "TrainingError",
    "RecipeError",
    "DataError",
    "closest",
    "short_repr",
    "divisors",
]


class VlmkitError(Exception):
    """Base class of every error vlmkit raises on purpose.

    ``hint`` is a short "what to do" line; the CLI prints it under the message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class SpecError(VlmkitError, ValueError):
    """A model spec (from config.json or YAML) is missing, malformed, contradictory or impossible.

    ``key_path`` is the dotted path of the offending key (``vision_config.patch_size``) and
    ``source`` the file it came from, when known.
    """

    def __init__(
        self, message: str, *, key_path: str | None = None, source: str | None = None, hint: str | None = None
    ) -> None:
        self.key_path = key_path
        self.source = source
        self.detail = message
        where = ""
        if key_path:
            where += f"{key_path}: "
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{where}{message}", hint=hint)


class UnknownComponentError(VlmkitError, KeyError):
    """A registry name that no installed plugin provides.

    ``where`` (``"model.yaml: vision_tower.name"``) says where the name came from, when known.
    """

    def __init__(self, kind: str, name: str, choices: Iterable[str], *, where: str | None = None) -> None:
        self.kind = kind
        self.name = name
        self.choices = sorted(choices)
        self.where = where
        near = closest(name, self.choices)
        msg = f"{where}: " if where else ""
        msg += f"unknown {kind} {name!r}; registered {kind}s: {', '.join(self.choices) or '(none)'}"
        if near:
            msg += f". Did you mean {near!r}?"
        super().__init__(msg, hint="install the plugin that provides it, or run `vlmkit plugins` to list names")

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


class PluginError(VlmkitError):
    """A plugin failed to load, or two plugins registered the same name."""


class WeightLoadError(VlmkitError):
    """Weights are missing, unexpected, mis-shaped, of a wrong dtype, corrupt or pickle-only."""


class PackingError(VlmkitError, ValueError):
    """Image placeholders in ``input_ids`` do not match the images given."""


class SourceNotFoundError(VlmkitError, FileNotFoundError):
    """A checkpoint folder or Hub repo id that cannot be found (or reached offline)."""


class ProcessorError(VlmkitError, ValueError):
    """Bad processor input: an unusable image, prompt, or a token budget exceeded."""


class GenerationError(VlmkitError, ValueError):
    """Generation arguments out of range, or a backbone that cannot honour the request."""


class TrainingError(VlmkitError):
    """Training cannot go on: a NaN/inf loss, a resume that does not fit, a run folder in the way."""


class RecipeError(TrainingError, ValueError):
    """A training recipe key is missing, unknown or impossible; ``key_path`` names it (``stages.1.train``)."""

    def __init__(self, message: str, *, key_path: str | None = None, source: str | None = None, hint: str | None = None) -> None:
        self.key_path = key_path
        self.source = source
        self.detail = message
        prefix = f"{source}: " if source else ""
        where = f"{key_path}: " if key_path else ""
        super().__init__(f"{prefix}{where}{message}", hint=hint)


class DataError(TrainingError, ValueError):
    """A training row is malformed: no assistant turn, image count mismatch, missing or corrupt image."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The registered name closest to ``name``, or ``None`` when nothing is close."""
    hits = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return hits[0] if hits else None


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters (deeply nested or huge values stay cheap)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 3, 6, 6, 6, 6
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, for "valid choices" in messages; cheap for any ``n`` (when ``n`` is
    astronomically large only the divisors up to 1000 are listed)."""
    import math

    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return []
    root = math.isqrt(n)
    if root > 1_000_000:
        return [d for d in range(1, 1001) if n % d == 0]
    small = [d for d in range(1, root + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})
