"""``quantize(model, scheme=...)``: one entry for every CPU speed scheme, chosen per CPU at run time.

Schemes (:data:`SCHEMES`):

* ``fp32`` -- no quantization: the float32 decode layout only (:mod:`vlmkit.decode_layout`);
* ``w8`` / ``w4`` -- weight-only int8 / int4 for one-row decode of the text backbone and its LM
  head (:mod:`vlmkit.weight_only`); prompts, batches and vision stay float32;
* ``w8a8`` -- :func:`vlmkit.quantize.quantize_int8` (dynamic int8 activations, SmoothQuant):
  vision and prefill too, but without VNNI/AMX it is far slower at prefill;
* ``int8`` (the CLI's ``--int8``) -- the fastest int8 scheme for *this* CPU: ``w8a8`` where the CPU
  has int8 dot products and a timing on the model's weights says its prompts are not slower than
  float32, otherwise ``w8`` (:func:`~vlmkit.scheme_choice.choose_int8`);
* ``auto`` -- the fastest of ``fp32``/``w8``/``w4`` (and ``w8a8`` where the CPU has int8 dot
  products), timed one-row and multi-row on the model's own largest weight group
  (:func:`~vlmkit.scheme_choice.choose_scheme`).

For ``auto`` and ``int8`` the report's ``choice`` holds the timings, the reason and the CPU flags.
Quantized layers (every scheme but ``fp32``) are cached on disk (:mod:`vlmkit.quant_cache`) when
``source`` (the checkpoint folder) is given: a second run loads them instead of re-quantizing.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from .decode_layout import ensure_decode_layout
from .errors import VlmkitError
from .int8_store import apply_int8, int8_mismatch, int8_tensors
from .quant_cache import cache_dir, cache_key, load_cached, load_choice, save_cached, save_choice
from .quantize import DEFAULT_SLOTS, Int8Linear, check_quantizable, quantize_int8
from .scheme_choice import CHOICE_RULES, INT8_DOT_FLAGS, choose_int8, choose_scheme, cpu_flags, float_linears, has_int8_dot
from .weight_only import FORMAT, HEAD_SCHEME, WEIGHT_ONLY, WeightOnlyLinear, w4_group, w8_group

__all__ = ["SCHEMES", "CHOSEN", "INT8_DOT_FLAGS", "quantize", "cache_name", "cpu_flags", "choose_scheme", "choose_int8", "has_int8_dot"]

SCHEMES = ("auto", "fp32", "w8", "w4", "w8a8", "int8")
#: the schemes resolved per CPU at run time, and what resolves each
CHOSEN = {"auto": choose_scheme, "int8": choose_int8}


def _check(model: nn.Module, scheme: str, flags: Any, timings: Any) -> nn.Module:
    """``model``'s backbone, once ``scheme`` and the options are checked."""
    if scheme not in SCHEMES:
        raise VlmkitError(f"quantization scheme {scheme!r} is not known", hint=f"choose one of {', '.join(SCHEMES)}")
    if scheme not in CHOSEN and (flags is not None or timings is not None):
        raise VlmkitError(f"flags= and timings= only apply to the schemes chosen per CPU ({', '.join(CHOSEN)}), not {scheme!r}",
                          hint="drop them, or quantize with scheme 'auto' or 'int8'")  # fmt: skip
    if flags is not None and not (isinstance(flags, dict) and isinstance(flags.get("flags"), (list, tuple))):
        raise VlmkitError(f"flags must be a dict like cpu_flags() returns; got {flags!r}",
                          hint='e.g. {"capability": "AVX2", "flags": ["avx2", "fma"]}')  # fmt: skip
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise VlmkitError("the model has no backbone slot to quantize", hint="quantize a vlmkit VLM (vlmkit.build_from_hf)")
    if getattr(model, "quantized", None):
        raise VlmkitError(f"the model is already quantized ({model.quantized})", hint="quantize a float32 model once")
    return backbone


def quantize(model: nn.Module, scheme: str = "auto", *, source: str | os.PathLike | None = None,
             cache: str | os.PathLike | None = None, flags: dict[str, Any] | None = None,
             timings: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Apply ``scheme`` (one of :data:`SCHEMES`) to ``model`` (a float32 CPU VLM) in place.

    ``source`` (the checkpoint folder) turns the on-disk cache on, in ``cache`` (default
    :func:`~vlmkit.quant_cache.cache_dir`). For ``auto``/``int8`` only: ``flags`` (a
    :func:`cpu_flags` dict) and ``timings`` (a :func:`~vlmkit.scheme_choice.time_schemes` dict)
    replace reading the CPU and timing it.

    Returns a report: ``requested``, ``scheme`` (the one applied), ``layers`` quantized,
    ``kept_float`` (weight-only: layer names left float32 and why), ``cache``
    (``hit``/``written``/``updated``/``off``), ``seconds``, and for ``auto``/``int8`` the
    ``choice`` (``why``, ``ms``, ``timed``, ``cpu``)."""
    backbone = _check(model, scheme, flags, timings)
    start = time.perf_counter()
    report: dict[str, Any] = {"requested": scheme}
    if scheme in CHOSEN:
        report["choice"] = _choose(scheme, backbone, flags, timings, source, cache)
        scheme = report["choice"]["scheme"]
    report["scheme"] = scheme
    if scheme == "w8a8":
        report.update(_w8a8(model, source, cache))
    elif scheme in WEIGHT_ONLY:
        report.update(_weight_only(model, backbone, scheme, source, cache))
        model.quantized = scheme
    else:
        ensure_decode_layout(backbone)
        report.update(layers=0, cache="off")
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _choose(scheme: str, backbone: nn.Module, flags, timings, source, cache) -> dict[str, Any]:  # noqa: ANN001
    """``auto``/``int8``'s choice: timed on this CPU, or (with ``source``) read back from the cache
    where an earlier run on a CPU with the same flags saved it (``"cached": True``), so a second
    run neither times nor re-quantizes. Given ``flags``/``timings`` are never cached."""
    if source is None or flags is not None or timings is not None:
        return CHOSEN[scheme](backbone, flags=flags, timings=timings)
    folder, key, here = cache_dir(cache), cache_key(source, f"choice-{scheme}-rules{CHOICE_RULES}"), cpu_flags()
    stored = load_choice(key, folder, here, tuple(s for s in SCHEMES if s not in CHOSEN))
    if stored is not None:
        return {**stored, "cached": True}
    choice = CHOSEN[scheme](backbone, flags=None, timings=None)
    save_choice(key, folder, choice)
    return choice


def _w8a8(model: nn.Module, source, cache) -> dict[str, Any]:  # noqa: ANN001
    """:func:`~vlmkit.quantize.quantize_int8` with its defaults, or its tensors from the cache."""
    check_quantizable(model, DEFAULT_SLOTS, None)  # before the cache is read: a bf16 model is refused, not "mismatched"
    if source is None:
        quantize_int8(model)
        return {"layers": sum(isinstance(m, Int8Linear) for m in model.modules()), "cache": "off"}
    folder, key = cache_dir(cache), cache_key(source, cache_name("w8a8"))
    stored = load_cached(key, "w8a8", folder, check=lambda tensors: int8_mismatch(model, tensors))
    if stored is not None:
        return {"layers": apply_int8(model, stored), "cache": "hit"}
    before = list(model.parameters())  # kept alive, so no replaced parameter's id is reused
    quantize_int8(model)
    save_cached(key, "w8a8", folder, int8_tensors(model, before))
    return {"layers": sum(isinstance(m, Int8Linear) for m in model.modules()), "cache": "written"}


def _head_linear(backbone: nn.Module) -> nn.Linear | None:
    """A tied head as an ``nn.Linear`` sharing ``embed_tokens.weight`` (None when untied)."""
    embed = getattr(backbone, "embed_tokens", None)
    if getattr(backbone, "lm_head", 0) is not None or not isinstance(embed, nn.Embedding):
        return None
    head = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False, device="meta")
    head.weight = embed.weight
    return head


def cache_name(scheme: str) -> str:
    """The name ``scheme``'s quantized layers are cached under (with ``source``, the
    :func:`~vlmkit.quant_cache.cache_key` of the file): weight-only copies carry their layout
    version (:data:`~vlmkit.weight_only.FORMAT`), so a new layout never reads an old file."""
    return f"{scheme}-format{FORMAT}" if scheme in WEIGHT_ONLY else scheme


def _layer_scheme(name: str, scheme: str) -> str:
    """The scheme layer ``name`` gets under ``scheme`` (the LM head may differ: :data:`HEAD_SCHEME`)."""
    return HEAD_SCHEME.get(scheme, scheme) if name == "lm_head" else scheme


def _expected(lin: nn.Linear, scheme: str) -> dict[str, tuple[torch.dtype, int, tuple[int, ...] | None]]:
    """Each part of ``lin``'s ``scheme`` copy: ``(dtype, bytes, shape)``."""
    out, inp = lin.out_features, lin.in_features
    if scheme == "w8":
        groups = inp // w8_group(inp)
        return {"q8": (torch.int8, out * inp, (out, inp)), "scale": (torch.float32, 4 * out * groups, (out, groups))}
    groups = inp // (w4_group(inp) or inp)
    per_group = (torch.float16, 2 * groups * out, (out, groups))
    return {"q4": (torch.uint8, out * inp // 2, (out, inp // 2)), "scale": per_group, "lo": per_group}


def _weight_only_mismatch(targets: list, scheme: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why cached ``tensors`` do not fit the ``targets`` layers (None when they do; layers the cache
    lacks are quantized and added)."""
    by_name = {name: lin for _, _, lin, name in targets}
    for key, value in tensors.items():
        name, _, part = key.partition("::")
        if name not in by_name:
            continue  # another model's layer: kept in the file, unused
        want = _expected(by_name[name], _layer_scheme(name, scheme)).get(part)
        if (want is None or value.dtype != want[0] or value.numel() * value.element_size() != want[1]
                or (want[2] is not None and tuple(value.shape) != want[2])):  # fmt: skip
            return f"{key} is {value.dtype} {tuple(value.shape)}, which does not fit the model's {name}"
    for name, lin in by_name.items():
        parts = {k.partition("::")[2] for k in tensors if k.partition("::")[0] == name}
        if parts and parts != set(_expected(lin, _layer_scheme(name, scheme))):
            return f"{name} stores {sorted(parts)}, expected {sorted(_expected(lin, _layer_scheme(name, scheme)))}"
    return None


def _weight_only(model: nn.Module, backbone: nn.Module, scheme: str, source, cache) -> dict[str, Any]:  # noqa: ANN001
    """Swap the backbone's linears (and a tied head) for :class:`WeightOnlyLinear` ``scheme``
    (the head: :data:`~vlmkit.weight_only.HEAD_SCHEME`; their float weights, read only by prompts
    and batches, keep their layout)."""
    names = {id(m): n for n, m in backbone.named_modules()}
    targets = [(p, a, lin, f"{names[id(p)]}.{a}".lstrip(".")) for p, a, lin in float_linears(backbone)]
    head = _head_linear(backbone)
    if head is not None:
        targets.append((backbone, "lm_head", head, "lm_head"))
    key = folder = None
    stored: dict[str, torch.Tensor] = {}
    status = "off"
    if source is not None:
        folder, key = cache_dir(cache), cache_key(source, cache_name(scheme))
        stored = load_cached(key, scheme, folder, check=lambda tensors: _weight_only_mismatch(targets, scheme, tensors)) or {}
        status = "hit" if stored else "written"
    kept, made, fresh = {}, 0, {}
    for parent, attr, lin, name in targets:
        this = _layer_scheme(name, scheme)
        if this == "w4" and w4_group(lin.in_features) is None:
            kept[name] = f"in_features={lin.in_features} is not a multiple of 32 (int4 groups)"
            continue
        parts = {k.split("::", 1)[1]: v for k, v in stored.items() if k.split("::", 1)[0] == name}
        try:
            layer = WeightOnlyLinear.from_linear(lin, this, parts or None)
        except VlmkitError as exc:
            raise VlmkitError(f"{name}: {exc.message}", hint=exc.hint) from None
        if not parts:
            fresh.update({f"{name}::{k}": v for k, v in layer.quantized.items()})
        setattr(parent, attr, layer)
        made += 1
    if key is not None and fresh:
        save_cached(key, scheme, folder, {**stored, **fresh})
        status = "written" if not stored else "updated"
    return {"layers": made, "kept_float": kept, "cache": status}
