"""A bounded Jinja sandbox for chat templates: no code, and bounded output, steps and time.

jinja2's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` stops a template from reaching
Python internals, but not from asking for ``'a' * 10**12``, ``10 ** 10 ** 10``, nested
``range`` loops of 10**10 steps or a namespace value doubled forty times. This environment
refuses each before it runs (:data:`~vlmkit.limits.LIMITS` ``template_output``,
``template_steps``, ``template_seconds``) and :func:`render_bounded` stops a rendering whose
output grows past the bound; every refusal is a :class:`TemplateBoundError` (a jinja
``TemplateError``), which the caller turns into a vlmkit error naming the template file.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from ..errors import short_repr
from ..limits import limit

__all__ = ["BoundedSandbox", "TemplateBoundError", "render_bounded"]


class TemplateBoundError(TemplateError):
    """A chat template went past one of its bounds (output size, steps, time)."""


class _Budget(threading.local):
    deadline: float = float("inf")
    steps: int = 0
    max_steps: int = 0
    max_output: int = 0


_budget = _Budget()


def _tick(n: int = 1) -> None:
    """Count ``n`` steps of the rendering in progress; raise when a bound is passed."""
    if not _budget.max_steps:
        return
    _budget.steps += n
    if _budget.steps > _budget.max_steps:
        raise TemplateBoundError(f"the template took more than {_budget.max_steps:,} steps (VLMKIT_MAX_TEMPLATE_STEPS)")
    if time.monotonic() > _budget.deadline:
        raise TemplateBoundError(f"the template ran longer than {limit('template_seconds')} s (VLMKIT_MAX_TEMPLATE_SECONDS)")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _check_size(size: int) -> None:
    cap = _budget.max_output or int(limit("template_output"))
    if size > cap:
        raise TemplateBoundError(
            f"the template would build a value of {size:,} items, over the output bound of {cap:,} (VLMKIT_MAX_TEMPLATE_OUTPUT)"
        )


def _check_args(args: tuple, kwargs: dict) -> None:
    """Refuse an integer argument above the output bound (a width, a count, a padding)."""
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, int) and not isinstance(arg, bool):
            _check_size(arg)


def _check_replace(value: Any, old: Any = None, new: Any = None) -> None:
    """Refuse a ``replace`` whose result would pass the output bound, before it is built."""
    if isinstance(value, str) and isinstance(old, str) and isinstance(new, str):
        hits = value.count(old) if old else len(value) + 1
        _check_size(len(value) + hits * max(len(new) - len(old), 0))


def _bounded_filter(name: str, func: Any) -> Any:
    """``func`` (a jinja filter) with its integer arguments, ``replace``'s result and its output
    bounded, and each call counted as a step. Keeps jinja's pass-context/environment marker."""
    import functools

    skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1  # (env/context,) value, *args

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_args(args[skip:], kwargs)
        if name == "replace" and len(args) > skip + 1:
            _check_replace(*args[skip - 1 : skip + 2])
        out = func(*args, **kwargs)
        _check_size(_size(out))
        return out

    return bounded


class _BoundedNamespace(Namespace):
    """``namespace()`` whose attributes cannot grow past the output bound (``ns.s = ns.s ~ ns.s``)."""

    def __setitem__(self, name: str, value: Any) -> None:
        _tick()
        _check_size(_size(value))
        super().__setitem__(name, value)


def _bounded_range(*args: int) -> range:
    """``range`` whose iterations count as steps (nested loops cannot run for hours)."""
    rng = range(*args)
    _check_size(len(rng))

    def counted():
        for i in rng:
            _tick()
            yield i

    return counted()  # type: ignore[return-value]


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every arithmetic result, call and loop step bounded."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals["range"] = _bounded_range
        self.globals["namespace"] = _BoundedNamespace
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def add_filter(self, name: str, func: Any) -> None:
        """Register a filter of the caller's (``tojson``...) with the same bounds as the built-ins."""
        self.filters[name] = _bounded_filter(name, func)

    def call_binop(self, context, operator_name: str, left: Any, right: Any) -> Any:  # noqa: ANN001
        _tick()
        if operator_name == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if abs(left).bit_length() * right > 65_536:  # a result of more than 64 Kibit
                raise TemplateBoundError(f"{short_repr(left)} ** {short_repr(right)} is too large a power for a chat template")
        if operator_name == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, int):
                    _check_size(len(seq) * count)
        if operator_name == "+" and _size(left) and _size(right):
            _check_size(_size(left) + _size(right))
        return super().call_binop(context, operator_name, left, right)

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's signature
        _tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes, list, tuple)):  # 'a'.ljust(10**10), 'a'.zfill(...)
            _check_args(args, kwargs)
            if getattr(__obj, "__name__", "") == "replace":
                _check_replace(owner, *args[:2])
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)


def render_bounded(template: Any, **variables: Any) -> str:
    """``template.render(**variables)`` within the output, step and time bounds.

    Raises :class:`TemplateBoundError` (and turns ``MemoryError`` / ``OverflowError`` /
    ``RecursionError`` from the template into one) instead of exhausting the machine.
    """
    saved = (_budget.deadline, _budget.steps, _budget.max_steps, _budget.max_output)
    _budget.deadline = time.monotonic() + float(limit("template_seconds"))
    _budget.steps, _budget.max_steps = 0, int(limit("template_steps"))
    _budget.max_output = int(limit("template_output"))
    parts: list[str] = []
    total = 0
    try:
        for chunk in template.generate(**variables):
            total += len(chunk)
            _check_size(total)
            _tick()
            parts.append(chunk)
    except MemoryError:
        raise TemplateBoundError("the template ran out of memory") from None
    except (OverflowError, RecursionError) as exc:
        raise TemplateBoundError(f"the template failed: {type(exc).__name__}: {exc}") from None
    except TemplateError:
        raise
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:  # e.g. 1 ** 'a', 1 / 0
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    finally:
        _budget.deadline, _budget.steps, _budget.max_steps, _budget.max_output = saved
    return "".join(parts)

