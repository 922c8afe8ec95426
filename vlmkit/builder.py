"""``build`` and ``build_from_hf``: a spec -> a :class:`~vlmkit.model.VLM`, weights loaded strictly.

The wiring (components instantiated with their neighbours' widths, the size guard) is
:mod:`vlmkit.wiring`; this module resolves dtype and device, reads each slot's weights through its
key map, fresh-inits the rest and moves the model."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .errors import PluginError, SourceNotFoundError, SpecError, VlmkitError, WeightLoadError, short_repr
from .family import checkpoint_key_map
from .model import VLM
from .protocols import SLOTS
from .spec import VLMSpec, load_yaml, validate_spec
from .weights import Checkpoint, LoadReport, load_component
from .wiring import MAX_INT_PARAM, MAX_LAYERS, Origin, assemble, assemble_within_memory

__all__ = ["build", "build_from_hf", "resolve_dtype", "resolve_device", "assemble", "Origin", "MAX_INT_PARAM", "MAX_LAYERS"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                  "fp64": "float64", "double": "float64"}  # fmt: skip


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, config: dict | None = None) -> torch.dtype:
    """The one dtype for the whole model.

    ``None`` (or ``"auto"``) means float32 on CPU (the path that matches transformers to 1e-4;
    bf16 matmuls are far slower than fp32 on CPUs without bf16 units, such as AVX2-only ones) and
    the checkpoint's ``torch_dtype`` elsewhere. ``dtype="bfloat16"`` on a CPU with AMX is an
    opt-in trade (see docs/speed.md). Only floating dtypes are
    accepted: a :class:`SpecError` names anything else.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise SpecError(
                f"dtype {dtype} is not a floating-point type; model weights must be floats",
                key_path="dtype", hint=f"choose one of {', '.join(_DTYPES)}",
            )
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        name = _DTYPE_ALIASES.get(dtype.removeprefix("torch."), dtype.removeprefix("torch."))
        if name not in _DTYPES:
            raise SpecError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}", key_path="dtype",
                            hint="pass a name such as 'bfloat16', a torch.dtype, or None for the default")  # fmt: skip
        return _DTYPES[name]
    if dtype is not None and dtype != "auto":
        raise SpecError(f"dtype must be a name such as 'bfloat16', a torch.dtype or None; got {type(dtype).__name__} {short_repr(dtype)}",
                        key_path="dtype", hint=f"choose one of {', '.join(_DTYPES)}")  # fmt: skip
    if device.type == "cpu":
        return torch.float32
    declared = (config or {}).get("torch_dtype") or (config or {}).get("dtype")
    return _DTYPES.get(declared, torch.float32) if isinstance(declared, str) else torch.float32


def resolve_device(device: str | int | torch.device | None) -> torch.device:
    """``device`` as a usable :class:`torch.device` (``None`` = CPU).

    A device that is malformed, absent on this machine (``"cuda"`` without a GPU, ``"cuda:3"``
    with one GPU) or unusable raises :class:`VlmkitError`, not a torch ``RuntimeError``.
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise VlmkitError(f"device must be a name such as 'cpu' or 'cuda:0', got {type(device).__name__} {short_repr(device)}",
                          hint="pass 'cpu', 'cuda', 'cuda:1', 'mps' or a torch.device")  # fmt: skip
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise VlmkitError(f"{device!r} is not a device name ({exc})", hint="use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if dev.type == "meta":
        raise VlmkitError("device 'meta' holds no data: a model built there cannot run",
                          hint="build on 'cpu' (or a GPU); for shapes only, use vlmkit.builder.assemble(spec, meta_slots=...)")  # fmt: skip
    _probe_device(dev)
    return dev


def _probe_device(dev: torch.device) -> None:
    backend = getattr(torch, dev.type, None) if dev.type != "cpu" else None
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise VlmkitError(
            f"device {str(dev)!r} is not available on this machine (torch.{dev.type}.is_available() is False)",
            hint=f"use device='cpu', or run where a {dev.type} device and a torch build supporting it exist",
        )
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise VlmkitError(f"device {str(dev)!r} does not exist: this machine has {count()} {dev.type} device(s)",
                          hint=f"use an index from 0 to {count() - 1}" if count() else "use device='cpu'")  # fmt: skip
    try:
        torch.empty(0, device=dev)
    except Exception as exc:  # torch says "no driver", "not compiled with ...", NotImplementedError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VlmkitError(f"cannot use device {str(dev)!r}: {first}", hint="use device='cpu', or check the driver") from None


def build(
    path_or_spec: str | os.PathLike | VLMSpec | dict,
    *,
    load_weights: bool = True,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
    check_finite: bool = False,
) -> VLM:
    """Build a model from a YAML file, a :class:`VLMSpec` or its dict form.

    With ``load_weights`` every slot whose spec names a weights source is loaded strictly:
    missing, unexpected or mis-shaped tensors raise one :class:`WeightLoadError` listing them by
    component. ``strict=False`` leaves those parameters at fresh init and records them in
    ``model.load_report``. Slots without a source are fresh (see ``model.untrained_parameters()``).

    Bad input of any kind (spec, dtype, device, weights) raises a :class:`~vlmkit.errors.VlmkitError`.
    ``check_finite=True`` also reads every loaded tensor and refuses NaN/inf values, naming them.
    """
    spec = _as_spec(path_or_spec)
    return _build(spec, _origin(path_or_spec), load_weights=load_weights, dtype=dtype, device=device, strict=strict,
                  check_finite=check_finite)  # fmt: skip


def _build(spec: VLMSpec, origin: Origin, *, load_weights: bool, dtype, device, strict: bool, check_finite: bool = False) -> VLM:
    """:func:`build` of a validated spec; ``origin`` (the YAML or config.json) is named in errors."""
    device = resolve_device(device)
    sources = {slot: spec.weights_for(slot) for slot in SLOTS} if load_weights else {}
    sources = {slot: src for slot, src in sources.items() if src}
    config = _weights_config(sources)
    target = resolve_dtype(dtype, device, config)
    model = assemble_within_memory(spec, frozenset(sources), origin=origin)
    report = LoadReport()
    for source, slots in _group(sources).items():
        _load_source(model, source, slots, target, report, all_slots=len(slots) == len(SLOTS), origin=origin)
    if not report.ok:
        if strict:
            raise WeightLoadError(
                "weights do not fit the model:\n" + report.summary(),
                hint="check that the checkpoint matches the spec, or pass strict=False to keep fresh init for these",
            )
        log.warning("weights loaded with problems (strict=False); fresh init kept for:\n%s", report.summary())
    _materialize(model, report, sources)
    model.load_report = report
    _move(model, device, target)
    if check_finite:
        from .finite import check_finite as refuse_nonfinite

        refuse_nonfinite(model, origin.path)
    if spec.freeze:
        model.freeze(*spec.freeze)
    return model.eval()


def _as_spec(path_or_spec) -> VLMSpec:
    if isinstance(path_or_spec, VLMSpec):
        return path_or_spec
    if isinstance(path_or_spec, dict):
        return validate_spec(path_or_spec)
    if not isinstance(path_or_spec, (str, os.PathLike)):
        raise SourceNotFoundError(
            f"build() takes a YAML path, a VLMSpec or its dict form; got {type(path_or_spec).__name__} {short_repr(path_or_spec)}",
            hint="for a Hugging Face checkpoint folder or repo id use build_from_hf()",
        )
    from .limits import check_path

    if check_path(path_or_spec).is_dir():
        from .run_folder import is_run_folder, load_run_spec

        if is_run_folder(path_or_spec):  # an output_dir of `vlmkit train`
            return load_run_spec(path_or_spec)
        raise SourceNotFoundError(
            f"{os.fspath(path_or_spec)!r} is a folder; build() takes a model YAML file",
            hint="for a Hugging Face checkpoint folder use build_from_hf(folder)",
        )
    return load_yaml(path_or_spec)


def _origin(path_or_spec) -> Origin:
    """The YAML file a spec came from, for error messages."""
    return Origin(os.fspath(path_or_spec) if isinstance(path_or_spec, (str, os.PathLike)) else None)


def _group(sources: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for slot, src in sources.items():
        grouped.setdefault(src, []).append(slot)
    return grouped


def _weights_config(sources: dict[str, str]) -> dict | None:
    for src in sources.values():
        path = Path(src) / "config.json"
        if path.is_file():
            from .limits import read_json_file

            with contextlib.suppress(VlmkitError):  # a bad config.json is reported where it is read for the spec
                data = read_json_file(path, kind="config.json")
                return data if isinstance(data, dict) else None
    return None


def _load_source(model: VLM, source: str, slots: list[str], dtype, report: LoadReport, *, all_slots: bool,
                 origin: Origin = Origin()) -> None:  # fmt: skip
    from .hf import family_of_folder
    from .hub import resolve_source

    try:
        folder = resolve_source(source, weights=True)
    except SourceNotFoundError as exc:
        if origin.path is None or origin.family is not None:  # a checkpoint's own weights: the message says it
            raise
        raise SourceNotFoundError(f"{origin.path}: weights ({', '.join(slots)}): {exc.message}", hint=exc.hint) from exc
    ckpt = Checkpoint(folder)
    family = family_of_folder(folder)  # it decides where each slot's tensors live in its files
    read: set[str] = set()
    for slot in slots:
        module = getattr(model, slot)
        keymap = checkpoint_key_map(family, slot, _key_map(slot, module), ckpt.keys())
        read |= load_component(slot, module, keymap, ckpt, dtype, report)
    if all_slots:
        report.unexpected.extend(sorted(ckpt.keys() - read))


def _key_map(slot: str, module: nn.Module):
    try:
        return module.key_map()
    except VlmkitError:
        raise
    except Exception as exc:
        raise PluginError(f"the {slot} component {type(module).__name__} has a broken key_map(): {type(exc).__name__}: {exc}",
                          hint="this is a bug in that component; vlmkit.testing checks key maps") from exc  # fmt: skip


def _materialize(model: VLM, report: LoadReport, sources: dict[str, str]) -> None:
    """Give every parameter still on the meta device (not in the checkpoint) a fresh init."""
    for slot, component in model.slots().items():
        fresh = [name for name, p in component.named_parameters() if p.is_meta]
        if slot not in sources:
            fresh = [name for name, _ in component.named_parameters()]
        if fresh:
            report.fresh[slot] = fresh
        for module in component.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                _fresh_init(module)


def _fresh_init(module: nn.Module) -> None:
    """Fresh-init ``module``'s meta parameters; its loaded ones (e.g. a weight whose bias was
    missing) are set aside while ``reset_parameters`` runs, then put back untouched."""
    kept = {}
    for name, p in module.named_parameters(recurse=False):
        if not p.is_meta:
            kept[name] = p
        module._parameters[name] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)  # noqa: SLF001
    _reset(module)
    for name, p in kept.items():
        module._parameters[name] = p  # noqa: SLF001


def _move(model: VLM, device: torch.device, dtype: torch.dtype) -> None:
    """Move to ``device``/``dtype``; then nothing may be left on the meta device."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        return  # already there (the usual case: loaded in the target dtype); skips a walk of every module
    try:
        model.to(device=device, dtype=dtype)
    except torch.OutOfMemoryError as exc:
        raise VlmkitError(f"not enough memory on {device} for the model in {dtype}: {str(exc).splitlines()[0]}",
                          hint="use a smaller dtype (bfloat16), another device, or a smaller model") from None  # fmt: skip
    except NotImplementedError as exc:  # "Cannot copy out of meta tensor"
        raise PluginError(f"a component left tensors without data on the meta device: {exc}",
                          hint="run vlmkit.testing's conformance checks on the component") from None  # fmt: skip
    on_meta = [f"{slot}.{n}" for slot, m in model.slots().items()
               for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]  # fmt: skip
    if on_meta:
        raise PluginError(
            f"after loading, {len(on_meta)} tensor(s) are still on the meta device (no data): {', '.join(on_meta[:6])}",
            hint="the component must compute such buffers in forward or make them persistent; see vlmkit.testing",
        )


def _reset(module: nn.Module) -> None:
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    for p in module.parameters(recurse=False):
        nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.ones_(p)


def build_from_hf(
    source: str | os.PathLike,
    *,
    load_weights: bool = True,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
    check_finite: bool = False,
) -> VLM:
    """Build a model from a Hugging Face checkpoint (folder or Hub repo id).

    ``load_weights=False`` builds the architecture with fresh init (config files only);
    ``check_finite=True`` refuses weights holding NaN/inf, naming the tensors.
    """
    from .hf import family_of_folder, resolve_config_folder, spec_from_hf
    from .run_folder import RUN_SPEC_NAME, is_run_folder, load_run_spec

    if is_run_folder(source):  # an output_dir of `vlmkit train`
        spec, origin = load_run_spec(source), Origin(f"{os.fspath(source)}/{RUN_SPEC_NAME}")
    else:
        spec = spec_from_hf(source)
        folder, _ = resolve_config_folder(source)
        origin = Origin(f"{os.fspath(source)}/config.json", family_of_folder(folder))
    return _build(spec, origin, load_weights=load_weights, dtype=dtype, device=device, strict=strict, check_finite=check_finite)
