"""The whole-model check: a component fills its slot of a tiny model that :func:`vlmkit.build`
assembles from a YAML-form dict, around the tiny built-in parts of :data:`TINY_NEIGHBOURS`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from .common import check_finite, validated_params, check_shape, where_of

if TYPE_CHECKING:
    from ..model import VLM

#: Tiny built-in parts that fill the other four slots in :func:`check_builds`.
TINY_NEIGHBOURS: dict[str, dict[str, Any]] = {
    "vision_tower": {"name": "siglip", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "image_size": 16, "patch_size": 4},
    "connector": {"name": "idefics3", "scale_factor": 1},  # scale 1 fits any patch grid
    "aligner": {"name": "hidden_align"},
    "packer": {"name": "image_packer", "image_token_id": 60},
    "backbone": {"name": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
}  # fmt: skip


@contextlib.contextmanager
def _registered(slot: str, cls: type, name: str | None) -> Iterator[str]:
    """The registry name of ``cls`` in ``slot``; an unregistered class is registered for the duration."""
    from .. import hookimpl
    from ..plugins import get_registry, register_plugin, unregister_plugin

    registry = get_registry()
    if name is not None:
        entry = registry.get(slot, name)
        assert entry.cls is cls, f"registry name {name!r} in {slot} is {entry.cls!r}, not {cls!r}"
        yield name
        return
    for entry in registry.entries():
        if entry.slot == slot and entry.cls is cls:
            yield entry.name
            return
    tmp_name = f"conformance-{cls.__name__}"

    class _Plugin:
        @hookimpl
        def vlmkit_register_components(self, registry):  # noqa: ANN001
            getattr(registry, f"add_{slot}")(tmp_name, cls)

    plugin_name = register_plugin(_Plugin(), name=f"vlmkit.testing:{tmp_name}")
    try:
        yield tmp_name
    finally:
        unregister_plugin(plugin_name)


def check_builds(
    slot: str, cls: type, params: Any, *, name: str | None = None, vocab_size: int | None = None,
    neighbours: Mapping[str, dict] | None = None,
):  # fmt: skip
    """``cls`` (with ``params``) fills ``slot`` of a tiny model built by :func:`vlmkit.build` from a
    YAML-form dict (``load_weights=False``), whose spec survives ``dump_yaml``/``load_yaml``; the
    model runs one image through. Returns the model.

    The other slots hold :data:`TINY_NEIGHBOURS`; ``neighbours`` replaces some of them (YAML form,
    e.g. ``{"connector": {"name": "idefics3", "scale_factor": 2}}``). ``name`` is the registry
    name of ``cls`` (found in the registry when ``None``; an unregistered class is registered for
    the duration of the check)."""
    import yaml

    from ..builder import build
    from ..spec import dump_yaml, validate_spec

    who = where_of(slot, cls)
    params = validated_params(cls, params, who)
    with _registered(slot, cls, name) as reg_name:
        data = _tiny_spec(slot, reg_name, params, vocab_size, neighbours)
        model = build(data, load_weights=False)
        again = validate_spec(yaml.safe_load(dump_yaml(model.spec)))
        assert again.to_dict() == model.spec.to_dict(), f"{who}: the spec does not survive dump_yaml/load_yaml"
        _run_one_image(model, who)
    return model


def _tiny_spec(
    slot: str, reg_name: str, params: Any, vocab_size: int | None, neighbours: Mapping[str, dict] | None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The YAML-form dict of the tiny model: ``params`` under ``reg_name`` in ``slot``, the neighbours
    elsewhere, with the backbone's vocabulary and the packer's image token id made to agree."""
    data = {s: dict(v) for s, v in {**TINY_NEIGHBOURS, **(neighbours or {})}.items()}
    data[slot] = {"name": reg_name, **params.model_dump(mode="json")}
    token = int(getattr(params, "image_token_id", data["packer"]["image_token_id"]))
    vocab = vocab_size or data["backbone"]["vocab_size"]
    if slot != "backbone":
        data["backbone"]["vocab_size"] = max(vocab, token + 1)
    if slot != "packer":
        data["packer"]["image_token_id"] = min(token, data["backbone"].get("vocab_size", vocab) - 1)
    return data


def _run_one_image(model: VLM, who: str) -> None:
    """One row ``[text, K placeholders, text]`` with one ``(1, 1, 3, S, S)`` image gives finite logits
    ``(1, K + 2, vocab_size)``."""
    k, side = model.packer.tokens_per_image, model.vision_tower.image_size
    tok = model.packer.image_token_id
    text = 0 if tok != 0 else 1
    ids = torch.tensor([[text, *[tok] * k, text]])
    pixels = torch.randn(1, 1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    check_shape(out.logits, (1, ids.shape[1], model.backbone.vocab_size), who, "the whole tiny model")
    check_finite(out.logits, who, "the whole tiny model's logits")
