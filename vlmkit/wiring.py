"""Wiring a spec into a :class:`~vlmkit.model.VLM`: the five components instantiated in order,
each given the widths of its neighbours, the cross-slot checks, and the size guard that runs on
the meta device before anything real is allocated. No weights are read here (that is
:mod:`vlmkit.builder`)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecError
from .facts import check_placeholder, checked_geometry, checked_tokens, make_component, packer_tokens
from .family import Family
from .limits import available_memory
from .model import VLM
from .protocols import SLOTS
from .spec import VLMSpec

__all__ = ["MAX_INT_PARAM", "MAX_LAYERS", "Origin", "assemble", "assemble_within_memory"]


def assemble(spec: VLMSpec, meta_slots: frozenset[str] = frozenset()) -> VLM:
    """Instantiate the five components, passing each the widths of its neighbours.

    Slots in ``meta_slots`` are built on the meta device (their weights come from a checkpoint;
    nothing process-wide is patched: torch's initialisers run on the value-less tensors, and
    parameters the checkpoint lacks get a real fresh init later). The tower's geometry and the
    connector's token count are those of :mod:`vlmkit.facts` (the processor's source too): a
    class that declares them must build instances that agree.
    """
    backbone = make_component(spec, "backbone", "backbone" in meta_slots)
    tower = make_component(spec, "vision_tower", "vision_tower" in meta_slots)
    geometry = checked_geometry(spec, tower)
    # a tower whose token count is not the square patch grid (a class token kept) declares num_tokens
    tokens = {} if geometry.num_tokens is None else {"num_tokens": geometry.num_tokens}
    connector = make_component(spec, "connector", "connector" in meta_slots, in_features=geometry.hidden_size,
                               grid=geometry.num_patches_per_side, out_features=backbone.hidden_size, **tokens)  # fmt: skip
    aligner = make_component(spec, "aligner", "aligner" in meta_slots, in_features=connector.out_features,
                             out_features=backbone.hidden_size)  # fmt: skip
    packer = make_component(spec, "packer", False, tokens_per_image=packer_tokens(spec, checked_tokens(spec, connector, geometry)))
    check_placeholder(packer.image_token_id, backbone.vocab_size)
    return VLM(spec, vision_tower=tower, connector=connector, aligner=aligner, packer=packer, backbone=backbone)


@dataclass(frozen=True)
class Origin:
    """Where a spec came from, for error messages: the file (``path``), and for a checkpoint's
    ``config.json`` the family that translates spec key paths into that file's keys."""

    path: str | None = None
    family: Family | None = None

    def error(self, exc: SpecError) -> SpecError:
        """``exc`` naming this origin (in the file's own key paths), unless it names a file already."""
        if self.path is None or exc.source is not None:
            return exc
        if self.family is not None:
            return self.family.config_error(exc, self.path)
        return SpecError(exc.detail, key_path=exc.key_path, source=self.path, hint=exc.hint)


def assemble_within_memory(spec: VLMSpec, meta_slots: frozenset[str], origin: Origin = Origin()) -> VLM:
    """:func:`assemble`, after checking on the meta device that the model fits in memory.

    (Fresh slots are built in float32 on the CPU, so an absurd size would otherwise allocate, or
    get the process killed, before any error could be raised.) Errors name ``origin``.
    """
    try:
        _check_depths(spec)
        shapes = assemble(spec, meta_slots=frozenset(SLOTS))
        n = sum(p.numel() for p in shapes.parameters()) + sum(b.numel() for b in shapes.buffers())
        room = available_memory()  # MemAvailable, the cgroup limit, ulimit -v: not total RAM
        if room is not None and n * 4 > room[0]:
            raise SpecError(
                f"this spec makes a model of {n:,} parameters ({n * 4 / 2**30:,.1f} GiB in float32) but only "
                f"{room[0] / 2**30:,.1f} GiB are left ({room[1]})",
                hint="check the sizes: hidden_size, intermediate_size, num_hidden_layers, vocab_size, image_size / patch_size",
            )
    except SpecError as exc:
        raise origin.error(exc) from exc.__cause__
    return shapes if meta_slots == frozenset(SLOTS) else assemble(spec, meta_slots=meta_slots)


#: The most layers one component may have: more is a typo or a hostile config (each layer is a
#: Python object, so even the meta-device size check would take minutes and gigabytes).
MAX_LAYERS = 1024
#: The largest integer param (a width, a vocabulary, a token id): more overflows torch's sizes.
MAX_INT_PARAM = 2**31 - 1


def _check_depths(spec: VLMSpec) -> None:
    """Refuse absurd layer counts (any int param named ``num_*layers``, also inside dict params
    such as ``hf_causal_lm``'s ``config``) before building anything."""
    for slot in SLOTS:
        for path, value in _int_items(dict(getattr(spec, slot).params), slot):
            key = path.rsplit(".", 1)[-1]
            if abs(value) > MAX_INT_PARAM:  # torch would fail deep inside with an overflow
                raise SpecError(
                    f"{value:,} is not a plausible size: vlmkit takes integer params up to {MAX_INT_PARAM:,} (2**31 - 1)",
                    key_path=path, hint="check the number; published models' widths and vocabularies are far smaller",
                )
            if key.startswith("num_") and key.endswith("layers") and value > MAX_LAYERS:
                raise SpecError(
                    f"{value:,} layers is not a plausible depth (vlmkit builds at most {MAX_LAYERS} per component)",
                    key_path=path, hint="check the number; published models have at most a few hundred",
                )


def _int_items(mapping: dict, prefix: str, depth: int = 0):
    for key, value in mapping.items():
        if isinstance(value, dict) and depth < 3:
            yield from _int_items(value, f"{prefix}.{key}", depth + 1)
        elif isinstance(value, int) and not isinstance(value, bool):
            yield f"{prefix}.{key}", value
