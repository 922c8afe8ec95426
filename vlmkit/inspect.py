"""``vlmkit inspect``: what a spec assembles into, and the shape of one image through each stage."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .protocols import SLOTS

__all__ = ["describe", "image_shapes", "load_for_inspect"]

log = logging.getLogger(__name__)


def load_for_inspect(source: str, load_weights: bool | None):
    """Build the model for ``source`` (YAML, folder or repo id); weights when available/asked.

    Returns ``(model, note)``; ``note`` says where the files came from.
    """
    from .builder import build
    from .hf import resolve_config_folder, spec_from_hf
    from .spec import load_yaml

    if source.endswith((".yaml", ".yml")):
        spec = load_yaml(source)
        has_weights = any(spec.weights_for(s) for s in SLOTS)
        return build(spec, load_weights=bool(has_weights if load_weights is None else load_weights)), f"YAML {source}"
    folder, bundled = resolve_config_folder(source)
    spec = spec_from_hf(folder if bundled else source)
    if bundled:
        note = f"{source}: Hub not reachable; using the config files bundled with vlmkit (no weights)"
        return build(spec, load_weights=False), note
    if load_weights is None:
        load_weights = any(Path(folder).glob("*.safetensors"))
    return build(spec, load_weights=load_weights), f"checkpoint {folder}"


def image_shapes(spec) -> list[tuple[str, tuple[int, ...]]]:
    """The shape after each stage for one image at the tower's size, traced on the meta device
    (no compute, no memory)."""
    from .builder import assemble

    model = assemble(spec, meta_slots=frozenset(SLOTS))
    tower = model.vision_tower
    side = tower.image_size
    stages: list[tuple[str, tuple[int, ...]]] = [("pixels", (side, side))]
    hooks = []

    def record(name):
        return lambda _m, _i, out: stages.append((name, tuple(out.shape[1:])))

    def record_input(name):
        return lambda _m, inp: stages.append((name, tuple(inp[0].shape[1:])))

    hooks.append(tower.register_forward_hook(record("vision_tower")))
    first_linear = next((m for m in model.connector.modules() if isinstance(m, torch.nn.Linear)), None)
    if first_linear is not None:
        hooks.append(first_linear.register_forward_pre_hook(record_input("connector (before projection)")))
    hooks.append(model.connector.register_forward_hook(record("connector")))
    if any(True for _ in model.aligner.parameters()):  # an identity aligner changes no shape
        hooks.append(model.aligner.register_forward_hook(record("aligner")))
    try:
        with torch.no_grad():
            model.aligner(model.connector(tower(torch.zeros(1, 3, side, side, device="meta"))))
    finally:
        for h in hooks:
            h.remove()
    return stages


def _fmt_shape(name: str, shape: tuple[int, ...]) -> str:
    if name == "pixels":
        return f"{shape[0]}x{shape[1]}"
    unit = "patches" if name == "vision_tower" else "tokens"
    return f"{shape[0]} {unit} x {shape[1]}"


def describe(source: str, *, load_weights: bool | None, console) -> None:
    """Print the assembled model of ``source`` to a rich ``console``."""
    from rich.table import Table

    from .plugins import plugin_sources

    model, note = load_for_inspect(source, load_weights)
    console.print(f"[bold]{source}[/bold]  ({note})")
    counts = model.parameter_counts()
    dists = plugin_sources()
    table = Table()
    for col in ("slot", "component", "plugin", "parameters"):
        table.add_column(col)
    from .plugins import get_registry

    for slot in SLOTS:
        cs = getattr(model.spec, slot)
        entry = get_registry().get(slot, cs.name)
        table.add_row(slot, cs.name, f"{entry.plugin} ({dists.get(entry.plugin, '?')})", f"{counts[slot]:,}")
    console.print(table)
    for slot in SLOTS:
        cs = getattr(model.spec, slot)
        params = ", ".join(f"{k}={v}" for k, v in cs.params.model_dump().items() if v is not None)
        console.print(f"  {slot} ({cs.name}): {params or '(no params)'}")
    console.print(f"total parameters: {sum(counts.values()):,}")
    stages = image_shapes(model.spec)
    console.print("one image: " + " -> ".join(_fmt_shape(n, s) for n, s in stages))
    console.print(f"visual tokens per image: {model.packer.tokens_per_image}")
    _print_weights(model, console)


def _print_weights(model, console) -> None:
    report = model.load_report
    if report is None or not report.loaded:
        console.print("weights: none loaded (fresh init)")
        return
    loaded = sum(report.loaded.values())
    status = "nothing missing" if report.ok else "PROBLEMS:\n" + report.summary()
    console.print(f"weights: {loaded} tensors loaded; {status}")
    fresh = model.untrained_parameters()
    if fresh:
        for slot, names in fresh.items():
            console.print(f"  no pretrained weights ({slot}): {len(names)} parameters, e.g. {', '.join(names[:4])}")
