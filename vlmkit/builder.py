"""``build`` and ``build_from_hf``: a spec -> a :class:`~vlmkit.model.VLM`, weights loaded strictly."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .errors import SpecError, WeightLoadError
from .model import VLM
from .protocols import SLOTS
from .spec import VLMSpec, load_yaml, validate_spec
from .weights import Checkpoint, LoadReport, load_component

__all__ = ["build", "build_from_hf", "resolve_dtype", "assemble"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, config: dict | None = None) -> torch.dtype:
    """The one dtype for the whole model.

    ``None`` means float32 on CPU (bf16 matmuls are far slower than fp32 on CPUs without bf16
    units) and the checkpoint's ``torch_dtype`` elsewhere.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise SpecError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    declared = (config or {}).get("torch_dtype") or (config or {}).get("dtype")
    return _DTYPES.get(declared, torch.float32)


def _component_cls(spec: VLMSpec, slot: str) -> type:
    from .plugins import get_registry

    return get_registry().get(slot, getattr(spec, slot).name).cls


def assemble(spec: VLMSpec, meta_slots: frozenset[str] = frozenset()) -> VLM:
    """Instantiate the five components, passing each the widths of its neighbours.

    Slots in ``meta_slots`` are built on the meta device (their weights come from a checkpoint).
    """

    def where(slot: str):
        return torch.device("meta") if slot in meta_slots else contextlib.nullcontext()

    with where("backbone"):
        backbone = _component_cls(spec, "backbone")(spec.backbone.params)
    with where("vision_tower"):
        tower = _component_cls(spec, "vision_tower")(spec.vision_tower.params)
    with where("connector"):
        connector = _component_cls(spec, "connector")(
            spec.connector.params, in_features=tower.hidden_size, grid=tower.num_patches_per_side,
            out_features=backbone.hidden_size,
        )
    with where("aligner"):
        aligner = _component_cls(spec, "aligner")(
            spec.aligner.params, in_features=connector.out_features, out_features=backbone.hidden_size
        )
    packer = _component_cls(spec, "packer")(spec.packer.params, tokens_per_image=_tokens(spec, connector))
    _check_vocab(spec, packer, backbone)
    return VLM(spec, vision_tower=tower, connector=connector, aligner=aligner, packer=packer, backbone=backbone)


def _tokens(spec: VLMSpec, connector: nn.Module) -> int:
    declared = getattr(spec.packer.params, "tokens_per_image", None)
    if declared is not None and declared != connector.tokens_per_image:
        raise SpecError(
            f"packer.tokens_per_image is {declared} but the connector makes {connector.tokens_per_image} "
            "visual tokens per image (from the tower's patch grid and the connector's scale)",
            key_path="packer.tokens_per_image",
            hint="remove tokens_per_image to take the connector's count, or fix the scale/image size",
        )
    return connector.tokens_per_image


def _check_vocab(spec: VLMSpec, packer: nn.Module, backbone: nn.Module) -> None:
    if not 0 <= packer.image_token_id < backbone.vocab_size:
        raise SpecError(
            f"image_token_id {packer.image_token_id} is outside the backbone vocabulary (vocab_size {backbone.vocab_size})",
            key_path="packer.image_token_id",
        )


def build(
    path_or_spec: str | os.PathLike | VLMSpec | dict,
    *,
    load_weights: bool = True,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
) -> VLM:
    """Build a model from a YAML file, a :class:`VLMSpec` or its dict form.

    With ``load_weights`` every slot whose spec names a weights source is loaded strictly:
    missing, unexpected or mis-shaped tensors raise one :class:`WeightLoadError` listing them by
    component. ``strict=False`` leaves those parameters at fresh init and records them in
    ``model.load_report``. Slots without a source are fresh (see ``model.untrained_parameters()``).
    """
    spec = _as_spec(path_or_spec)
    device = torch.device(device) if device is not None else torch.device("cpu")
    sources = {slot: spec.weights_for(slot) for slot in SLOTS} if load_weights else {}
    sources = {slot: src for slot, src in sources.items() if src}
    config = _weights_config(sources)
    target = resolve_dtype(dtype, device, config)
    model = assemble(spec, meta_slots=frozenset(sources))
    report = LoadReport()
    for source, slots in _group(sources).items():
        _load_source(model, source, slots, target, report, all_slots=len(slots) == len(SLOTS))
    if not report.ok:
        if strict:
            raise WeightLoadError(
                "weights do not fit the model:\n" + report.summary(),
                hint="check that the checkpoint matches the spec, or pass strict=False to keep fresh init for these",
            )
        log.warning("weights loaded with problems (strict=False); fresh init kept for:\n%s", report.summary())
    _materialize(model, report, sources)
    model.load_report = report
    model.to(device=device, dtype=target)
    if spec.freeze:
        model.freeze(*spec.freeze)
    return model.eval()


def _as_spec(path_or_spec) -> VLMSpec:
    if isinstance(path_or_spec, VLMSpec):
        return path_or_spec
    if isinstance(path_or_spec, dict):
        return validate_spec(path_or_spec)
    return load_yaml(path_or_spec)


def _group(sources: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for slot, src in sources.items():
        grouped.setdefault(src, []).append(slot)
    return grouped


def _weights_config(sources: dict[str, str]) -> dict | None:
    for src in sources.values():
        path = Path(src) / "config.json"
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                return json.loads(path.read_text(encoding="utf-8"))
    return None


def _load_source(model: VLM, source: str, slots: list[str], dtype, report: LoadReport, *, all_slots: bool) -> None:
    from .hub import resolve_source

    ckpt = Checkpoint(resolve_source(source, weights=True))
    read: set[str] = set()
    for slot in slots:
        module = getattr(model, slot)
        read |= load_component(slot, module, module.key_map(), ckpt, dtype, report)
    if all_slots:
        report.unexpected.extend(sorted(ckpt.keys() - read))


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
                module.to_empty(device="cpu", recurse=False)
                _reset(module)


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
) -> VLM:
    """Build a model from a Hugging Face checkpoint (folder or Hub repo id).

    ``load_weights=False`` builds the architecture with fresh init (config files only).
    """
    from .hf import spec_from_hf

    spec = spec_from_hf(source)
    return build(spec, load_weights=load_weights, dtype=dtype, device=device, strict=strict)
