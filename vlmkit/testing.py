"""Conformance kit: plain functions a component's tests call to check it against vlmkit's protocols.

A plugin's test suite needs one line per component::

    from vlmkit.testing import check_vision_tower

    def test_tower_conforms():
        check_vision_tower(MyTower, MyTower.Params(hidden_size=16, image_size=16, patch_size=4))

Each ``check_*`` builds the component from small params and asserts (raising ``AssertionError``
with a message that says what to fix):

- the protocol attributes and methods are there (:mod:`vlmkit.protocols`);
- ``Params`` is a pydantic model and the params survive a YAML (JSON-mode) round trip;
- the forward pass maps a small input to the documented shapes, with finite values;
- the output dtype and device follow the input after ``module.to(dtype)`` (float32, float64,
  bfloat16 on CPU);
- every parameter gets a gradient (no dead weights that would stay "untrained" for ever);
- ``state_dict`` keys and shapes are the same across two constructions, ``key_map()`` covers
  them exactly, ``KeyMap.export`` round-trips, and a copy built on the ``meta`` device (as the
  builder does when a checkpoint supplies the weights) loads from the exported safetensors with
  nothing left on ``meta`` and computes the same output;
- the component builds inside a whole tiny model from a YAML-form dict through
  :func:`vlmkit.build` (``load_weights=False``) and that model runs one image through.

:func:`check_component` dispatches on the slot name. The tiny neighbour parts used for the
whole-model check are in :data:`TINY_NEIGHBOURS`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .keymap import KeyMap
from .protocols import SLOTS, Aligner, Backbone, Connector, Packer, VisionTower

__all__ = [
    "TINY_NEIGHBOURS",
    "check_component",
    "check_vision_tower",
    "check_connector",
    "check_aligner",
    "check_packer",
    "check_backbone",
    "check_key_map",
    "check_builds",
]

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

#: dtypes every component must follow on CPU.
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


# ============================================================================== helpers
def _where(slot: str, cls: type) -> str:
    return f"{slot} {getattr(cls, '__qualname__', cls)!r}"


def _params(cls: type, params: Any, who: str) -> Any:
    from pydantic import BaseModel

    p_cls = getattr(cls, "Params", None)
    assert isinstance(p_cls, type) and issubclass(p_cls, BaseModel), (
        f"{who}: needs a class attribute `Params` that is a pydantic BaseModel subclass (got {p_cls!r})"
    )
    if isinstance(params, Mapping):
        params = p_cls.model_validate(dict(params))
    assert isinstance(params, p_cls), f"{who}: params must be a {p_cls.__name__} (or a dict of its fields); got {type(params).__name__}"
    dumped = params.model_dump(mode="json")
    again = p_cls.model_validate(dumped)
    assert again == params, (
        f"{who}: params do not survive the YAML round trip Params.model_validate(params.model_dump(mode='json')): "
        f"{params!r} became {again!r}"
    )
    return params


def _attrs(module: nn.Module, names: tuple[str, ...], who: str, kind: type = int) -> None:
    for name in names:
        assert hasattr(module, name), f"{who}: missing attribute `{name}` required by the protocol"
        value = getattr(module, name)
        assert isinstance(value, kind) and not isinstance(value, bool), (
            f"{who}: `{name}` must be a {kind.__name__}; got {value!r}"
        )
        if kind is int:
            assert value > 0 or name == "image_token_id", f"{who}: `{name}` must be positive; got {value}"


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _finite(out: torch.Tensor, who: str, what: str) -> None:
    assert bool(torch.isfinite(out.float()).all()), f"{who}: {what} holds NaN or inf"


def _shape(out: Any, want: tuple[int, ...], who: str, what: str) -> None:
    assert isinstance(out, torch.Tensor), f"{who}: {what} must return a tensor; got {type(out).__name__}"
    assert tuple(out.shape) == want, f"{who}: {what} returned shape {tuple(out.shape)}, expected {want}"


# ============================================================================== shared checks
def check_key_map(make: Callable[[], nn.Module], who: str, run: Callable[[nn.Module], torch.Tensor], slot: str) -> None:
    """State-dict stability, exact key-map coverage, export round trip and meta-device loading.

    ``make()`` constructs the component; ``run(module)`` returns its output on a fixed input.
    """
    from .weights import Checkpoint, LoadReport, load_component, save_safetensors

    with _seeded(0):
        first = make()
    with _seeded(1):
        second = make()
    shapes_1 = [(k, tuple(v.shape)) for k, v in first.state_dict().items()]
    shapes_2 = [(k, tuple(v.shape)) for k, v in second.state_dict().items()]
    assert shapes_1 == shapes_2, (
        f"{who}: state_dict keys/shapes differ between two constructions with the same params: "
        f"{sorted(set(shapes_1) ^ set(shapes_2))[:6]}"
    )
    km = first.key_map()
    assert isinstance(km, KeyMap), f"{who}: key_map() must return a vlmkit.keymap.KeyMap; got {type(km).__name__}"
    state = first.state_dict()
    local = [r.local for r in km]
    missing = sorted(set(state) - set(local))
    extra = sorted(set(local) - set(state))
    assert not missing, f"{who}: key_map() has no rule for state_dict keys {missing[:6]} (they could never be loaded)"
    assert not extra, f"{who}: key_map() has rules for keys not in the state_dict: {extra[:6]}"
    sources = km.checkpoint_keys()
    dupes = sorted({s for s in sources if sources.count(s) > 1})
    assert not dupes, f"{who}: key_map() reads checkpoint keys {dupes[:6]} more than once"
    for rule in km:
        if len(rule.sources) > 1:
            rows = sum(rule.rows or ())
            assert rows == state[rule.local].shape[0], (
                f"{who}: fused rule {rule.local!r} splits {rule.rows} rows but the tensor has {state[rule.local].shape[0]}"
            )
    exported = km.export(state)
    assert set(exported) == set(sources), f"{who}: KeyMap.export wrote {sorted(set(exported) ^ set(sources))[:6]} unexpectedly"
    for rule in km:
        back = torch.cat([exported[s] for s in rule.sources], dim=0) if len(rule.sources) > 1 else exported[rule.sources[0]]
        assert torch.equal(back, state[rule.local]), f"{who}: KeyMap.export does not round-trip {rule.local!r}"

    with tempfile.TemporaryDirectory(prefix="vlmkit-conformance-") as tmp:
        save_safetensors(exported, Path(tmp) / "model.safetensors")
        with torch.device("meta"):
            meta = make()
        report = LoadReport()
        load_component(slot, meta, meta.key_map(), Checkpoint(tmp), torch.float32, report)
    assert report.ok, f"{who}: loading its own exported weights through key_map() failed:\n{report.summary()}"
    with contextlib.suppress(NotImplementedError):  # "cannot copy out of meta tensor": reported below
        meta.to(device="cpu", dtype=torch.float32)  # as the builder does after loading
    on_meta = [n for n, t in [*meta.named_parameters(), *meta.named_buffers()] if t.is_meta]
    assert not on_meta, (
        f"{who}: built on the meta device and loaded from a checkpoint, {on_meta[:6]} are still on meta -- "
        "compute such buffers in forward (or make them persistent so the key map covers them)"
    )
    first.eval()
    meta.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(meta), run(first), msg=lambda m: f"{who}: reloaded copy computes differently: {m}")


def _dtype_and_grads(module: nn.Module, run: Callable[[nn.Module, torch.dtype], torch.Tensor], who: str) -> None:
    for dtype in DTYPES:
        module.to(dtype).eval()
        with torch.no_grad():
            out = run(module, dtype)
        assert out.dtype == dtype, f"{who}: after .to({dtype}) with {dtype} input, output dtype is {out.dtype}"
        assert out.device.type == "cpu", f"{who}: output moved to {out.device} (input and module on cpu)"
        _finite(out, who, f"{dtype} output")
    module.to(torch.float32).train()
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if params:
        run(module, torch.float32).float().pow(2).mean().backward()
        dead = [n for n, p in params if p.grad is None]
        assert not dead, (
            f"{who}: parameters {dead[:6]} get no gradient from forward -- unused weights "
            "(e.g. a classifier head) would be reported as untrained for ever; don't build them"
        )
        module.zero_grad(set_to_none=True)
    module.eval()


# ============================================================================== per slot
def check_vision_tower(
    cls: type, params: Any, *, name: str | None = None, batch: int = 2, build: bool = True,
    neighbours: Mapping[str, dict] | None = None,
) -> nn.Module:  # fmt: skip
    """``cls(params)``: ``(N, 3, S, S) -> (N, (S/p)**2, hidden_size)`` at ``S = image_size``. Returns the tower."""
    who = _where("vision_tower", cls)
    params = _params(cls, params, who)
    with _seeded():
        tower = cls(params)
    assert isinstance(tower, nn.Module), f"{who}: must be a torch.nn.Module"
    _attrs(tower, ("hidden_size", "patch_size", "image_size", "num_patches_per_side"), who)
    assert tower.num_patches_per_side == tower.image_size // tower.patch_size, (
        f"{who}: num_patches_per_side={tower.num_patches_per_side} but image_size // patch_size = "
        f"{tower.image_size // tower.patch_size}"
    )
    assert isinstance(tower, VisionTower), f"{who}: does not satisfy vlmkit.protocols.VisionTower"
    side, grid = tower.image_size, tower.num_patches_per_side
    pixels = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))

    def run(module, dtype=torch.float32):
        return module(pixels.to(dtype))

    tower.eval()
    with torch.no_grad():
        out = run(tower)
        _shape(out, (batch, grid * grid, tower.hidden_size), who, "forward(pixels)")
        _finite(out, who, "forward(pixels)")
        full = torch.ones(batch, grid, grid, dtype=torch.bool)
        torch.testing.assert_close(
            tower(pixels, full), out, msg=lambda m: f"{who}: an all-True patch_attention_mask must equal no mask: {m}"
        )
    _dtype_and_grads(tower, run, who)
    check_key_map(lambda: cls(params), who, run, "vision_tower")
    if build:
        check_builds("vision_tower", cls, params, name=name, neighbours=neighbours)
    return tower


def check_connector(
    cls: type, params: Any, *, in_features: int = 16, grid: int = 4, out_features: int = 24,
    name: str | None = None, batch: int = 2, build: bool = True, neighbours: Mapping[str, dict] | None = None,
) -> nn.Module:  # fmt: skip
    """``cls(params, in_features=, grid=, out_features=)``: ``(N, grid**2, in) -> (N, tokens_per_image, out_features)``."""
    who = _where("connector", cls)
    params = _params(cls, params, who)

    def make():
        return cls(params, in_features=in_features, grid=grid, out_features=out_features)

    with _seeded():
        conn = make()
    _attrs(conn, ("out_features", "tokens_per_image"), who)
    assert isinstance(conn, Connector), f"{who}: does not satisfy vlmkit.protocols.Connector"
    feats = torch.randn(batch, grid * grid, in_features, generator=torch.Generator().manual_seed(0))

    def run(module, dtype=torch.float32):
        return module(feats.to(dtype))

    conn.eval()
    with torch.no_grad():
        out = run(conn)
    _shape(out, (batch, conn.tokens_per_image, conn.out_features), who, f"forward({tuple(feats.shape)})")
    _finite(out, who, "forward")
    _dtype_and_grads(conn, run, who)
    check_key_map(make, who, run, "connector")
    if build:
        check_builds("connector", cls, params, name=name, neighbours=neighbours)
    return conn


def check_aligner(
    cls: type, params: Any, *, in_features: int = 16, out_features: int = 24, name: str | None = None,
    tokens: int = 4, batch: int = 2, build: bool = True, neighbours: Mapping[str, dict] | None = None,
) -> nn.Module:  # fmt: skip
    """``cls(params, in_features=, out_features=)``: ``(N, K, in) -> (N, K, out)``; also with equal widths."""
    who = _where("aligner", cls)
    params = _params(cls, params, who)
    for d_in in (in_features, out_features):

        def make(d_in=d_in):
            return cls(params, in_features=d_in, out_features=out_features)

        with _seeded():
            aligner = make()
        assert isinstance(aligner, Aligner), f"{who}: does not satisfy vlmkit.protocols.Aligner"
        x = torch.randn(batch, tokens, d_in, generator=torch.Generator().manual_seed(0))

        def run(module, dtype=torch.float32, x=x):
            return module(x.to(dtype))

        aligner.eval()
        with torch.no_grad():
            out = run(aligner)
        _shape(out, (batch, tokens, out_features), who, f"forward({tuple(x.shape)}) with in_features={d_in}")
        _dtype_and_grads(aligner, run, who)
        check_key_map(make, who, run, "aligner")
    if build:
        check_builds("aligner", cls, params, name=name, neighbours=neighbours)
    return aligner


def check_packer(
    cls: type, params: Any, *, tokens_per_image: int = 4, hidden_size: int = 8, name: str | None = None,
    build: bool = True, neighbours: Mapping[str, dict] | None = None,
) -> nn.Module:  # fmt: skip
    """``cls(params, tokens_per_image=K)``: placeholders of row ``b`` replaced by its images' tokens, in order;
    every other position unchanged."""
    who = _where("packer", cls)
    params = _params(cls, params, who)

    def make():
        return cls(params, tokens_per_image=tokens_per_image)

    with _seeded():
        packer = make()
    _attrs(packer, ("image_token_id", "tokens_per_image"), who)
    assert isinstance(packer, Packer), f"{who}: does not satisfy vlmkit.protocols.Packer"
    assert packer.tokens_per_image == tokens_per_image, f"{who}: tokens_per_image={packer.tokens_per_image}, built with {tokens_per_image}"
    k, tok = tokens_per_image, packer.image_token_id
    text = tok + 1
    ids = torch.tensor([[text, *[tok] * k, text, *[tok] * k, text], [text] * (2 * k + 3)])
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, ids.shape[1], hidden_size, generator=g)
    images = torch.randn(2, k, hidden_size, generator=g)

    def run(module, dtype=torch.float32):
        return module(ids, embeds.to(dtype), images.to(dtype), [2, 0])

    with torch.no_grad():
        out = run(packer)
    _shape(out, tuple(embeds.shape), who, "forward(input_ids, inputs_embeds, image_tokens, [2, 0])")
    is_img = ids == tok
    assert torch.equal(out[~is_img], embeds[~is_img]), f"{who}: text positions changed (only placeholders may be replaced)"
    assert torch.equal(out[is_img], images.reshape(-1, hidden_size)), (
        f"{who}: placeholder positions do not hold the image tokens in order"
    )
    _dtype_and_grads(packer, run, who)
    check_key_map(make, who, run, "packer")
    if build:
        check_builds("packer", cls, params, name=name, neighbours=neighbours)
    return packer


def check_backbone(
    cls: type, params: Any, *, name: str | None = None, batch: int = 2, seq_len: int = 5, build: bool = True,
    neighbours: Mapping[str, dict] | None = None,
) -> nn.Module:  # fmt: skip
    """``cls(params)``: ``embed (B, T) -> (B, T, D)``, ``forward -> (B, T, D)``, ``logits -> (B, T, V)``."""
    who = _where("backbone", cls)
    params = _params(cls, params, who)
    with _seeded():
        bb = cls(params)
    _attrs(bb, ("hidden_size", "vocab_size"), who)
    for method in ("embed", "forward", "logits"):
        assert callable(getattr(bb, method, None)), f"{who}: missing method `{method}`"
    assert isinstance(bb, Backbone), f"{who}: does not satisfy vlmkit.protocols.Backbone"
    ids = torch.randint(0, bb.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[-1, 0] = 0  # one left-padded row

    def run(module, dtype=torch.float32):
        embeds = module.embed(ids)
        assert embeds.dtype == dtype, f"{who}: embed() returned {embeds.dtype} from a {dtype} module"
        return module.logits(module(embeds, attention_mask=mask))

    bb.eval()
    with torch.no_grad():
        embeds = bb.embed(ids)
        _shape(embeds, (batch, seq_len, bb.hidden_size), who, "embed(input_ids)")
        hidden = bb(embeds, attention_mask=mask)
        _shape(hidden, (batch, seq_len, bb.hidden_size), who, "forward(inputs_embeds, attention_mask)")
        logits = bb.logits(hidden)
        _shape(logits, (batch, seq_len, bb.vocab_size), who, "logits(hidden)")
        _finite(logits[:, 1:], who, "logits")
    _dtype_and_grads(bb, run, who)
    check_key_map(lambda: cls(params), who, run, "backbone")
    if build:
        check_builds("backbone", cls, params, name=name, vocab_size=bb.vocab_size, neighbours=neighbours)
    return bb


_CHECKS = {
    "vision_tower": check_vision_tower,
    "connector": check_connector,
    "aligner": check_aligner,
    "packer": check_packer,
    "backbone": check_backbone,
}


def check_component(slot: str, cls: type, params: Any, **dims: Any) -> nn.Module:
    """Run the ``check_*`` of ``slot`` (``vision_tower``, ``connector``, ...); ``dims`` go to it."""
    assert slot in _CHECKS, f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}"
    return _CHECKS[slot](cls, params, **dims)


# ============================================================================== whole model
@contextlib.contextmanager
def _registered(slot: str, cls: type, name: str | None) -> Iterator[str]:
    """The registry name of ``cls`` in ``slot``; an unregistered class is registered for the duration."""
    from . import hookimpl
    from .plugins import get_registry, register_plugin, unregister_plugin

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

    from .builder import build
    from .spec import dump_yaml, validate_spec

    who = _where(slot, cls)
    params = _params(cls, params, who)
    with _registered(slot, cls, name) as reg_name:
        data = {s: dict(v) for s, v in {**TINY_NEIGHBOURS, **(neighbours or {})}.items()}
        data[slot] = {"name": reg_name, **params.model_dump(mode="json")}
        token = int(getattr(params, "image_token_id", data["packer"]["image_token_id"]))
        vocab = vocab_size or data["backbone"]["vocab_size"]
        if slot != "backbone":
            data["backbone"]["vocab_size"] = max(vocab, token + 1)
        if slot != "packer":
            data["packer"]["image_token_id"] = min(token, data["backbone"].get("vocab_size", vocab) - 1)
        model = build(data, load_weights=False)
        again = validate_spec(yaml.safe_load(dump_yaml(model.spec)))
        assert again.to_dict() == model.spec.to_dict(), f"{who}: the spec does not survive dump_yaml/load_yaml"
        k, side = model.packer.tokens_per_image, model.vision_tower.image_size
        tok = model.packer.image_token_id
        text = 0 if tok != 0 else 1
        ids = torch.tensor([[text, *[tok] * k, text]])
        pixels = torch.randn(1, 1, 3, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
        _shape(out.logits, (1, ids.shape[1], model.backbone.vocab_size), who, "the whole tiny model")
        _finite(out.logits, who, "the whole tiny model's logits")
    return model
