"""Which quantization scheme is fastest on *this* CPU: its flags, and short timings on the model's
own weights (what :func:`vlmkit.quant_schemes.quantize` runs for ``auto`` and ``int8``).

:func:`time_schemes` times, on one weight group (the backbone's largest: every weight of one
shape), A/B alternated, medians in ms:

* ``one_row`` -- one row through the weights of the group (a decode step; at most
  :data:`ONE_ROW_ELEMENTS` weight elements, more than a cache holds): float32 (its decode layout),
  ``w8``/``w4`` (weight-only kernels) and ``w8a8`` (the dynamic int8 kernel);
* ``multi_row`` -- a block of :data:`PROMPT_ROWS` rows (a prompt or an image's patches) through
  the first few weights of the group (:data:`BLOCK_ELEMENTS` weight elements at most, to keep it
  short): float32 and ``w8a8``. ``w8``/``w4`` are not timed there: their multi-row calls run the
  float32 weights themselves.

:func:`pick_scheme` (``auto``) takes a quantized scheme only when it is >= 10% faster one-row
(:data:`DECODE_GAIN`) and not slower multi-row (within :data:`PROMPT_SLACK`);
:func:`choose_int8` (``int8``, the CLI's ``--int8``) takes ``w8a8`` where the CPU has int8 dot
products (:func:`has_int8_dot`), its prompts are not slower than float32 and it decodes at least
as fast as ``w8``, otherwise ``w8``. Both take ``timings`` (the dict :func:`time_schemes` returns)
instead of timing, and ``flags`` (the dict :func:`cpu_flags` returns) instead of reading the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .decode_layout import ensure_decode_layout, linear_rows
from .errors import VlmkitError
from .quantize import Int8Linear
from .weight_only import WEIGHT_ONLY, WeightOnlyLinear, w4_group

__all__ = ["INT8_DOT_FLAGS", "PROMPT_ROWS", "DECODE_GAIN", "PROMPT_SLACK", "CHOICE_RULES", "ONE_ROW_ELEMENTS", "BLOCK_ELEMENTS", "TIME_BUDGET_S", "cpu_flags", "has_int8_dot",
           "float_linears", "weight_group", "time_schemes", "pick_scheme", "choose_scheme", "choose_int8"]  # fmt: skip

#: CPU flags worth printing beside speed figures
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
#: CPU flags with int8 dot-product instructions, which the dynamic ``w8a8`` mode needs to be fast.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: most weight elements the one-row timing multiplies (96 MiB of float32: beyond the caches a
#: decode step can hope for, yet a fraction of a second to quantize and time)
ONE_ROW_ELEMENTS = 24 << 20
#: rows of the multi-row timing block (a prompt, an image's patches)
PROMPT_ROWS = 64
#: most weight elements the multi-row block multiplies (keeps the timing a fraction of a second)
BLOCK_ELEMENTS = 4 << 20
#: seconds after which each timing (one-row, multi-row) stops adding rounds
TIME_BUDGET_S = 0.4
#: a quantized scheme must take at most this share of float32's one-row time (>= 10% faster)
DECODE_GAIN = 0.9
#: ... and at most this share of float32's multi-row time ("not slower", within noise)
PROMPT_SLACK = 1.05
#: part of the cache key of a stored choice: bumped when the rules above change, so a choice an
#: older vlmkit made (e.g. before the native decode step) is made again, not reused
CHOICE_RULES = 3


def cpu_flags() -> dict[str, Any]:
    """torch's CPU capability and the :data:`INTERESTING_FLAGS` in ``/proc/cpuinfo`` (Linux):
    ``{"capability": "AVX512", "flags": ["avx2", ...]}``."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"capability": torch.backends.cpu.get_cpu_capability(), "flags": [f for f in INTERESTING_FLAGS if f in flags]}


def has_int8_dot(flags: dict[str, Any] | None = None) -> bool:
    """Whether this CPU (or ``flags``, a :func:`cpu_flags` dict) has VNNI or AMX int8 instructions;
    without them ``w8a8`` prompts run far slower than float32 (measured 13-16x on an AVX2-only EPYC)."""
    found = (flags if flags is not None else cpu_flags())["flags"]
    return any(f in found for f in INT8_DOT_FLAGS)


def float_linears(backbone: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for the backbone's float32 ``nn.Linear`` layers."""
    out = []
    for _, module in backbone.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.Linear) and not isinstance(child, WeightOnlyLinear) and child.weight.dtype == torch.float32:
                out.append((module, attr, child))
    return out


def weight_group(backbone: nn.Module) -> list[torch.Tensor]:
    """The ``(out, in)`` weights of the backbone's largest group of one shape (most elements in
    all); empty when it has no float32 linear layer."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for _, _, lin in float_linears(backbone):
        groups.setdefault(tuple(lin.weight.shape), []).append(lin.weight)
    return max(groups.values(), key=lambda ws: len(ws) * ws[0].numel()) if groups else []


def _alternate(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each function over ``rounds`` A/B-alternated rounds (after one warm-up each;
    fewer rounds, two at least, once :data:`TIME_BUDGET_S` has passed: a busy machine)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    begin = time.perf_counter()
    for fn in fns.values():
        fn()
    for r in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
        if r >= 1 and time.perf_counter() - begin > TIME_BUDGET_S:
            break
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


def _layers(weights: list[torch.Tensor], scheme: str) -> list[nn.Module]:
    """``scheme`` layers (``w8``/``w4``/``w8a8``) built from copies of ``weights``."""
    if scheme == "w8a8":
        return [Int8Linear.from_weight(w) for w in weights]
    out = []
    for w in weights:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(w.detach(), requires_grad=False)
        out.append(WeightOnlyLinear.from_linear(lin, scheme))
    return out


def time_schemes(weights: list[torch.Tensor], schemes: tuple[str, ...], rounds: int = 5, rows: int = PROMPT_ROWS) -> dict[str, Any]:
    """Time float32 and ``schemes`` (of ``w8``, ``w4``, ``w8a8``) on ``weights`` (``(out, in)``,
    one shape); see the module docstring. Returns ``{"one_row": {scheme: ms}, "multi_row":
    {scheme: ms}, "rows", "timed"}`` (``timed`` says on what, in words)."""
    out_f, in_f = weights[0].shape
    total = len(weights)
    weights = weights[: max(1, ONE_ROW_ELEMENTS // weights[0].numel())]
    block = max(1, min(len(weights), BLOCK_ELEMENTS // weights[0].numel()))
    x, xs = torch.randn(1, in_f), torch.randn(rows, in_f)
    one = {"fp32": lambda: [linear_rows(x, w) for w in weights]}
    multi = {"fp32": lambda: [linear_rows(xs, w) for w in weights[:block]]}
    with torch.inference_mode():
        for scheme in schemes:
            if scheme == "w4" and w4_group(in_f) is None:
                continue
            layers = _layers(weights, scheme)
            one[scheme] = lambda layers=layers: [layer(x) for layer in layers]
            if scheme not in WEIGHT_ONLY:
                multi[scheme] = lambda layers=layers: [layer(xs) for layer in layers[:block]]
        timed = {"one_row": _alternate(one, rounds), "multi_row": _alternate(multi, rounds) if len(multi) > 1 else {}}
    what = f"one row x {len(weights)} of {total} ({out_f}x{in_f}) weights" + (f"; {rows} rows x {block} of them" if timed["multi_row"] else "")
    return {**timed, "rows": rows, "timed": what}


def check_timings(timings: Any, one_row: tuple[str, ...], multi_row: tuple[str, ...]) -> dict[str, Any]:
    """``timings`` (given or measured) checked: positive ms for ``one_row``/``multi_row`` schemes."""
    for kind, schemes in (("one_row", one_row), ("multi_row", multi_row)):
        got = timings.get(kind) if isinstance(timings, dict) else None
        bad = [s for s in schemes if not isinstance(got, dict) or not isinstance(got.get(s), (int, float)) or not got[s] > 0]
        if bad:
            raise VlmkitError(f"timings[{kind!r}] needs positive ms for {', '.join(bad)}; got {got!r}",
                              hint='e.g. {"one_row": {"fp32": 8.3, "w8": 22.0}, "multi_row": {"fp32": 4.1}} (what time_schemes returns)')  # fmt: skip
    return timings


def _verdict(scheme: str, timings: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``scheme`` qualifies for ``auto`` (see :func:`pick_scheme`) and why, in words."""
    one, multi, rows = timings["one_row"], timings.get("multi_row", {}), timings.get("rows", PROMPT_ROWS)
    r1 = one[scheme] / one["fp32"]
    if r1 > DECODE_GAIN:
        return False, f"one-row {r1:.2f}x float32 (needs <= {DECODE_GAIN:.2f}x)"
    if scheme in WEIGHT_ONLY:
        return True, f"one-row {r1:.2f}x float32 (prompts run the float32 weights)"
    if scheme not in multi or "fp32" not in multi:
        return False, "not timed multi-row"
    r2 = multi[scheme] / multi["fp32"]
    return r2 <= PROMPT_SLACK, f"one-row {r1:.2f}x, {rows} rows {r2:.2f}x float32" + (
        "" if r2 <= PROMPT_SLACK else f" (prompts need <= {PROMPT_SLACK:.2f}x)")  # fmt: skip


def pick_scheme(timings: dict[str, Any]) -> dict[str, str]:
    """``auto``'s choice from ``timings`` (:func:`time_schemes`' dict): the quantized scheme with
    the fastest one-row time among those >= 10% faster than float32 one-row and (``w8a8``) not
    slower multi-row; float32 when none is. Returns ``{"scheme", "why"}``."""
    schemes = tuple(s for s in timings.get("one_row", {}) if s != "fp32") if isinstance(timings, dict) else ()
    check_timings(timings, ("fp32", *schemes), ())
    verdicts = {s: _verdict(s, timings) for s in schemes}
    ok = [s for s, (good, _) in verdicts.items() if good]
    best = min(ok, key=timings["one_row"].get) if ok else "fp32"
    why = "; ".join(f"{s}: {text}" for s, (_, text) in verdicts.items()) or "no quantized scheme timed"
    return {"scheme": best, "why": why}


def choose_scheme(backbone: nn.Module, rounds: int = 5, *, flags: dict[str, Any] | None = None,
                  timings: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """``auto``: time ``fp32``/``w8``/``w4`` (and ``w8a8`` where :func:`has_int8_dot`) on the
    backbone's largest weight group (or use ``timings``) and :func:`pick_scheme`. Returns
    ``{"scheme", "why", "ms": {"one_row", "multi_row"}, "timed", "cpu"}``."""
    flags = flags if flags is not None else cpu_flags()
    schemes = ("w8", "w4") + (("w8a8",) if has_int8_dot(flags) else ())
    if timings is None:
        ensure_decode_layout(backbone)
        weights = weight_group(backbone)
        if not weights:
            return {"scheme": "fp32", "why": "no float32 linear layer to time", "ms": {}, "timed": "nothing", "cpu": flags}
        timings = time_schemes(weights, schemes, rounds)
    elif isinstance(timings, dict) and isinstance(timings.get("one_row"), dict):  # only the schemes this CPU may take
        timings = {**timings, "one_row": {k: v for k, v in timings["one_row"].items() if k == "fp32" or k in schemes}}
    picked = pick_scheme(timings)
    ms = {k: timings.get(k, {}) for k in ("one_row", "multi_row")}
    return {**picked, "ms": ms, "timed": timings.get("timed", "given timings"), "cpu": flags}


def _int8_pick(dot: bool, flags: dict[str, Any], timings: dict[str, Any], native_w8: bool = False) -> tuple[str, str]:
    """``(scheme, why)`` of :func:`choose_int8`."""
    one, multi, rows = timings["one_row"], timings.get("multi_row", {}), timings.get("rows", PROMPT_ROWS)
    if native_w8:
        return "w8", ("the backbone decodes w8 (weight-only int8, prompts and images stay float32) in one native "
                      "call per token, which w8a8's dynamic int8 layers cannot use")  # fmt: skip
    if not dot:
        scheme = "w8"
        why = (f"this CPU has no VNNI/AMX int8 dot products (flags: {' '.join(flags['flags']) or '-'}), where w8a8 "
               "prompts run far slower than float32: weight-only w8 (prompts and images stay float32)")  # fmt: skip
    else:
        r1, r2 = one["w8a8"] / one["fp32"], multi["w8a8"] / multi["fp32"]
        scheme = "w8a8" if r2 <= PROMPT_SLACK and one["w8a8"] <= one["w8"] else "w8"
        have = " ".join(f for f in flags["flags"] if f in INT8_DOT_FLAGS)
        timed = f"w8a8 one-row {r1:.2f}x, {rows} rows {r2:.2f}x float32; w8 one-row {one['w8'] / one['fp32']:.2f}x"
        if scheme == "w8a8":
            why = f"this CPU has {have} and w8a8 prompts are not slower than float32 ({timed})"
        elif r2 > PROMPT_SLACK:
            why = f"w8a8 prompts would be slower than float32 here ({timed}): weight-only w8 (prompts stay float32)"
        else:
            why = f"w8 decodes faster than w8a8 here ({timed})"
    if scheme == "w8" and one["w8"] > one["fp32"]:
        why += (f"; note: w8 decodes slower than float32 on this CPU (one-row {one['w8'] / one['fp32']:.2f}x), "
                "--quantize auto keeps float32 where that is faster")  # fmt: skip
    return scheme, why


def choose_int8(backbone: nn.Module, rounds: int = 5, *, flags: dict[str, Any] | None = None,
                timings: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """``int8`` (``--int8``): the fastest int8 scheme for this CPU, ``w8a8`` or ``w8`` (see the
    module docstring); ``timings``/``flags`` as for :func:`choose_scheme`. Returns ``{"scheme",
    "why", "ms", "timed", "cpu"}``."""
    flags = flags if flags is not None else cpu_flags()
    dot = has_int8_dot(flags)
    native_decode = getattr(backbone, "native_decode", None)
    if timings is None and callable(native_decode) and native_decode("w8") and not native_decode("w8a8"):
        why = _int8_pick(dot, flags, {"one_row": {}}, native_w8=True)[1]
        return {"scheme": "w8", "why": why, "ms": {}, "timed": "nothing (the native step decides)", "cpu": flags}
    if timings is None:
        ensure_decode_layout(backbone)
        weights = weight_group(backbone)
        if not weights:
            scheme = "w8a8" if dot else "w8"
            return {"scheme": scheme, "why": "no float32 linear layer to time", "ms": {}, "timed": "nothing", "cpu": flags}
        timings = time_schemes(weights, ("w8", "w8a8") if dot else ("w8",), rounds)
    check_timings(timings, ("fp32", "w8", "w8a8") if dot else ("fp32", "w8"), ("fp32", "w8a8") if dot else ())
    scheme, why = _int8_pick(dot, flags, timings)
    ms = {k: timings.get(k, {}) for k in ("one_row", "multi_row")}
    return {"scheme": scheme, "why": why, "ms": ms, "timed": timings.get("timed", "given timings"), "cpu": flags}
