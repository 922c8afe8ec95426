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

    Returns ``(model, note)``; ``note`` says where the files came from, and why no weights were
    loaded when the default (``load_weights=None``: "when available") found none. Without
    weights the model is only assembled on the meta device (shapes and counts; it cannot run).
    """
    from .builder import build
    from .hf import resolve_config_folder, spec_from_hf
    from .spec import load_yaml

    from .run_folder import is_run_folder, load_run_spec

    if source.endswith((".yaml", ".yml")):
        return _load_yaml_for_inspect(load_yaml(source), source, load_weights)
    if is_run_folder(source):  # an output_dir of `vlmkit train`
        return _load_yaml_for_inspect(load_run_spec(source), source, load_weights)
    folder, bundled = resolve_config_folder(source)
    spec = spec_from_hf(folder if bundled else source)
    if bundled:
        note = f"{source}: Hub not reachable; using the config files bundled with vlmkit (no weights)"
        return _without_weights(spec), note
    if load_weights is None:
        load_weights = any(Path(folder).glob("*.safetensors"))
    model = build(spec, load_weights=True) if load_weights else _without_weights(spec)
    return model, f"checkpoint {folder}"


def _without_weights(spec):
    """The model assembled on the meta device: shapes and parameter counts, no memory or init time."""
    from .builder import assemble

    return assemble(spec, meta_slots=frozenset(SLOTS))


def _load_yaml_for_inspect(spec, source: str, load_weights: bool | None):
    from .builder import build

    wanted = sorted({src for src in (spec.weights_for(s) for s in SLOTS) if src})
    if not wanted or load_weights is False:
        return _without_weights(spec), f"YAML {source}" + ("; weights not loaded" if wanted else "")
    if load_weights is None:
        absent = _unavailable(wanted)
        if absent:
            note = (f"YAML {source}; weights {', '.join(absent)} not available here (offline or not downloaded), "
                    "so built without weights")  # fmt: skip
            return _without_weights(spec), note
    return build(spec, load_weights=True), f"YAML {source}"


def _unavailable(sources: list[str]) -> list[str]:
    """The weight sources that cannot be found (folder absent, Hub unreachable, no safetensors)."""
    from .errors import VlmkitError
    from .hub import resolve_source
    from .weights import find_weight_files

    absent = []
    for src in sources:
        try:
            find_weight_files(resolve_source(src, weights=True))
        except VlmkitError:
            absent.append(src)
    return absent


def image_shapes(spec, *, trace: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """The shape after each stage for one image at the tower's size, from the sizes the assembled
    (meta-device, weightless) components declare through their protocols: the tower's
    ``num_patches_per_side`` and ``hidden_size``, the connector's ``tokens_per_image``,
    ``out_features`` and first linear layer, the backbone's ``hidden_size`` after a projecting
    aligner. ``trace=True`` runs the parts on the meta device instead (no compute, no memory, but
    torch's first meta op costs ~1 s of lazy imports); the two agree for every built-in."""
    from .builder import assemble

    model = assemble(spec, meta_slots=frozenset(SLOTS))
    if trace:
        return _traced_shapes(model)
    tower, connector = model.vision_tower, model.connector
    stages: list[tuple[str, tuple[int, ...]]] = [("pixels", (tower.image_size, tower.image_size))]
    stages.append(("vision_tower", (tower.num_patches_per_side**2, tower.hidden_size)))
    first_linear = next((m for m in connector.modules() if isinstance(m, torch.nn.Linear)), None)
    if first_linear is not None:
        stages.append(("connector (before projection)", (connector.tokens_per_image, first_linear.in_features)))
    stages.append(("connector", (connector.tokens_per_image, connector.out_features)))
    if any(True for _ in model.aligner.parameters()):  # an identity aligner changes no shape
        stages.append(("aligner", (connector.tokens_per_image, model.backbone.hidden_size)))
    return stages


def _traced_shapes(model) -> list[tuple[str, tuple[int, ...]]]:  # noqa: ANN001
    """:func:`image_shapes` by running one meta-device image through the parts, with hooks."""
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
    if any(True for _ in model.aligner.parameters()):
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


def describe(source: str, *, load_weights: bool | None, console, check: bool = False) -> None:
    """Print the assembled model of ``source`` to a rich ``console``; ``check`` also reads every
    weight and refuses NaN/inf values (a :class:`~vlmkit.errors.WeightLoadError` naming them)."""
    from rich.table import Table

    from .plugins import plugin_sources

    from rich.markup import escape

    model, note = load_for_inspect(source, True if check and load_weights is None else load_weights)
    if check:
        _check_weights(model, source, console)
    console.print(f"[bold]{escape(source)}[/bold]  ({escape(note)})")
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
        console.print(f"  {slot} ({cs.name}): {params or '(no params)'}", markup=False)
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
    console.print(f"weights: {loaded} tensors loaded; {status}", markup=False)
    fresh = model.untrained_parameters()
    if fresh:
        for slot, names in fresh.items():
            console.print(f"  no pretrained weights ({slot}): {len(names)} parameters, e.g. {', '.join(names[:4])}", markup=False)


def _check_weights(model, source: str, console) -> None:
    """``inspect --check``: every loaded tensor finite, or a WeightLoadError naming those that are not."""
    from .errors import VlmkitError
    from .finite import check_finite

    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        raise VlmkitError(f"--check reads the weights, but {source} was assembled without them",
                          hint="drop --no-weights, or pass a source that has weights")  # fmt: skip
    check_finite(model, source)
    console.print(f"check: all {len(tensors):,} tensors are finite (no NaN/inf)", markup=False)
