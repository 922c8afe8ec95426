"""``quantize(model, scheme=...)``: one entry for every CPU speed scheme, chosen per CPU at run time.

Schemes (:data:`SCHEMES`):

* ``fp32`` -- no quantization: the float32 decode layout only (:mod:`vlmkit.decode_layout`);
* ``w8`` / ``w4`` -- weight-only int8 / int4 for one-row decode of the text backbone and its LM
  head (:mod:`vlmkit.weight_only`); prompts, batches and vision stay float32;
* ``w8a8`` -- :func:`vlmkit.quantize.quantize_int8` (dynamic int8 activations, SmoothQuant;
  the CLI's ``--int8``): vision and prefill too, but without VNNI/AMX it is slower at prefill;
* ``auto`` -- the fastest of ``fp32``/``w8``/``w4`` on *this* CPU: each is timed on the model's
  own largest weight group (A/B alternated) and a weight-only scheme wins only when >= 10%
  faster than float32. The CPU flags and timings are kept in the returned report.

Weight-only layers can be cached on disk (:mod:`vlmkit.quant_cache`) when ``source`` (the
checkpoint folder) is given: a second run loads them instead of re-quantizing.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from .decode_layout import ensure_decode_layout
from .errors import VlmkitError
from .quant_cache import cache_dir, cache_key, load_cached, save_cached
from .weight_only import WEIGHT_ONLY, WeightOnlyLinear, faster_than_float, w4_group

__all__ = ["SCHEMES", "INT8_DOT_FLAGS", "quantize", "cpu_flags", "choose_scheme", "has_int8_dot"]

SCHEMES = ("auto", "fp32", "w8", "w4", "w8a8")
#: CPU flags worth printing beside speed figures
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_flags() -> dict[str, Any]:
    """torch's CPU capability and the :data:`INTERESTING_FLAGS` in ``/proc/cpuinfo`` (Linux)."""
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


#: CPU flags with int8 dot-product instructions, which the dynamic ``w8a8`` mode needs to be fast.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_int8_dot(flags: dict[str, Any] | None = None) -> bool:
    """Whether this CPU has VNNI or AMX int8 instructions (see :func:`cpu_flags`); without them the
    ``w8a8`` (``--int8``) prompts run far slower than float32 (measured 13-16x on an AVX2-only EPYC)."""
    found = (flags or cpu_flags())["flags"]
    return any(f in found for f in INT8_DOT_FLAGS)


def _linears(backbone: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for the backbone's float32 ``nn.Linear`` layers."""
    out = []
    for name, module in backbone.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.Linear) and not isinstance(child, WeightOnlyLinear) and child.weight.dtype == torch.float32:
                out.append((module, attr, child))
    return out


def choose_scheme(backbone: nn.Module, rounds: int = 5) -> dict[str, Any]:
    """Time ``fp32``/``w8``/``w4`` one-row products on the backbone's largest weight group; returns
    ``{"scheme", "ms": {scheme: ms}, "cpu": cpu_flags()}``."""
    ensure_decode_layout(backbone)
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for _, _, lin in _linears(backbone):
        groups.setdefault(tuple(lin.weight.shape), []).append(lin.weight)
    if not groups:
        return {"scheme": "fp32", "ms": {}, "cpu": cpu_flags()}
    weights = max(groups.values(), key=lambda ws: len(ws) * ws[0].numel())
    ms: dict[str, float] = {}
    best, best_ms = "fp32", None
    for scheme in ("w8", "w4"):
        if scheme == "w4" and w4_group(weights[0].shape[1]) is None:
            continue
        faster, fp, q = faster_than_float(weights, scheme, rounds)
        ms["fp32"], ms[scheme] = round(fp, 3), round(q, 3)
        if faster and (best_ms is None or q < best_ms):
            best, best_ms = scheme, q
    return {"scheme": best, "ms": ms, "cpu": cpu_flags()}


def quantize(model: nn.Module, scheme: str = "auto", *, source: str | os.PathLike | None = None,
             cache: str | os.PathLike | None = None) -> dict[str, Any]:  # fmt: skip
    """Apply ``scheme`` (one of :data:`SCHEMES`) to ``model`` (a float32 CPU VLM) in place.

    Returns a report: ``scheme`` (the one applied; ``auto`` resolved), ``layers`` quantized,
    ``kept_float`` (layer names left float32 and why), ``cache`` (``hit``/``written``/``off``),
    ``seconds``, and for ``auto`` the timings and CPU flags it chose by."""
    if scheme not in SCHEMES:
        raise VlmkitError(f"quantization scheme {scheme!r} is not known", hint=f"choose one of {', '.join(SCHEMES)}")
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise VlmkitError("the model has no backbone slot to quantize", hint="quantize a vlmkit VLM (vlmkit.build_from_hf)")
    if getattr(model, "quantized", None):
        raise VlmkitError(f"the model is already quantized ({model.quantized})", hint="quantize a float32 model once")
    start = time.perf_counter()
    report: dict[str, Any] = {"requested": scheme}
    if scheme == "auto":
        report["auto"] = choose_scheme(backbone)
        scheme = report["auto"]["scheme"]
    report["scheme"] = scheme
    if scheme == "w8a8":
        from .quantize import Int8Linear, quantize_int8

        quantize_int8(model)
        report["layers"] = sum(isinstance(m, Int8Linear) for m in model.modules())
    elif scheme in WEIGHT_ONLY:
        report.update(_weight_only(model, backbone, scheme, source, cache))
        model.quantized = scheme
    else:
        ensure_decode_layout(backbone)
        report["layers"] = 0
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _head_linear(backbone: nn.Module) -> nn.Linear | None:
    """A tied head as an ``nn.Linear`` sharing ``embed_tokens.weight`` (None when untied)."""
    embed = getattr(backbone, "embed_tokens", None)
    if getattr(backbone, "lm_head", 0) is not None or not isinstance(embed, nn.Embedding):
        return None
    head = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False, device="meta")
    head.weight = embed.weight
    return head


def _weight_only(model: nn.Module, backbone: nn.Module, scheme: str, source, cache) -> dict[str, Any]:  # noqa: ANN001
    """Swap the backbone's linears (and a tied head) for :class:`WeightOnlyLinear` ``scheme``
    (their float weights, read only by prompts and batches, keep their layout)."""
    names = {id(m): n for n, m in backbone.named_modules()}
    targets = [(p, a, lin, f"{names[id(p)]}.{a}".lstrip(".")) for p, a, lin in _linears(backbone)]
    head = _head_linear(backbone)
    if head is not None:
        targets.append((backbone, "lm_head", head, "lm_head"))
    key = folder = None
    stored: dict[str, torch.Tensor] = {}
    status = "off"
    if source is not None:
        folder, key = cache_dir(cache), cache_key(source, scheme)
        stored = load_cached(key, scheme, folder) or {}
        status = "hit" if stored else "written"
    kept, made, fresh = {}, 0, {}
    for parent, attr, lin, name in targets:
        if scheme == "w4" and w4_group(lin.in_features) is None:
            kept[name] = f"in_features={lin.in_features} is not a multiple of 32 (int4 groups)"
            continue
        parts = {k.split("::", 1)[1]: v for k, v in stored.items() if k.split("::", 1)[0] == name}
        layer = WeightOnlyLinear.from_linear(lin, scheme, parts or None)
        if not parts:
            fresh.update({f"{name}::{k}": v for k, v in layer.quantized.items()})
        setattr(parent, attr, layer)
        made += 1
    if key is not None and fresh:
        save_cached(key, scheme, folder, {**stored, **fresh})
        status = "written" if not stored else "updated"
    return {"layers": made, "kept_float": kept, "cache": status}
