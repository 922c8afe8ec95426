"""One ``check_*`` per slot, each building the component from small params and checking its
protocol attributes, forward shapes, dtypes, gradients and key map (and, with ``build=True``, a
whole tiny model around it); :func:`check_component` dispatches on the slot name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..facts import geometry_of
from ..protocols import SLOTS, Aligner, Backbone, Connector, DeclaresGeometry, DeclaresTokenCount, Packer, VisionTower
from .common import check_attrs, check_dtype_and_grads, check_finite, validated_params, seeded, check_shape, where_of
from .key_map import check_key_map
from .whole_model import check_builds


def check_vision_tower(
    cls: type, params: Any, *, name: str | None = None, batch: int = 2, build: bool = True,
    neighbours: Mapping[str, dict] | None = None,
) -> nn.Module:  # fmt: skip
    """``cls(params)``: ``(N, 3, S, S) -> (N, K, hidden_size)`` at ``S = image_size``, ``K = (S/p)**2``
    or the tower's ``num_tokens`` when it has one (e.g. a kept class token). Returns the tower."""
    who = where_of("vision_tower", cls)
    params = validated_params(cls, params, who)
    with seeded():
        tower = cls(params)
    assert isinstance(tower, nn.Module), f"{who}: must be a torch.nn.Module"
    check_attrs(tower, ("hidden_size", "patch_size", "image_size", "num_patches_per_side"), who)
    assert tower.num_patches_per_side == tower.image_size // tower.patch_size, (
        f"{who}: num_patches_per_side={tower.num_patches_per_side} but image_size // patch_size = "
        f"{tower.image_size // tower.patch_size}"
    )
    assert isinstance(tower, VisionTower), f"{who}: does not satisfy vlmkit.protocols.VisionTower"
    if isinstance(cls, DeclaresGeometry):
        declared, built = cls.geometry(params), geometry_of(tower)
        assert declared == built, f"{who}: geometry(params) is {declared} but the instance has {built}"
    side, grid = tower.image_size, tower.num_patches_per_side
    if hasattr(tower, "num_tokens"):
        check_attrs(tower, ("num_tokens",), who)
    tokens = getattr(tower, "num_tokens", grid * grid)
    pixels = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))

    def run(module, dtype=torch.float32):
        return module(pixels.to(dtype))

    tower.eval()
    with torch.no_grad():
        out = run(tower)
        check_shape(out, (batch, tokens, tower.hidden_size), who, "forward(pixels)")
        check_finite(out, who, "forward(pixels)")
        full = torch.ones(batch, grid, grid, dtype=torch.bool)
        torch.testing.assert_close(
            tower(pixels, full), out, msg=lambda m: f"{who}: an all-True patch_attention_mask must equal no mask: {m}"
        )
    check_dtype_and_grads(tower, run, who)
    check_key_map(lambda: cls(params), who, run, "vision_tower")
    if build:
        check_builds("vision_tower", cls, params, name=name, neighbours=neighbours)
    return tower


def check_connector(
    cls: type, params: Any, *, in_features: int = 16, grid: int = 4, out_features: int = 24,
    name: str | None = None, batch: int = 2, build: bool = True, neighbours: Mapping[str, dict] | None = None,
) -> nn.Module:  # fmt: skip
    """``cls(params, in_features=, grid=, out_features=)``: ``(N, grid**2, in) -> (N, tokens_per_image, out_features)``."""
    who = where_of("connector", cls)
    params = validated_params(cls, params, who)

    def make():
        return cls(params, in_features=in_features, grid=grid, out_features=out_features)

    with seeded():
        conn = make()
    check_attrs(conn, ("out_features", "tokens_per_image"), who)
    assert isinstance(conn, Connector), f"{who}: does not satisfy vlmkit.protocols.Connector"
    if isinstance(cls, DeclaresTokenCount):
        declared = cls.count_tokens(params, grid=grid)
        assert declared == conn.tokens_per_image, (
            f"{who}: count_tokens(params, grid={grid}) is {declared} but the instance makes {conn.tokens_per_image}"
        )
    feats = torch.randn(batch, grid * grid, in_features, generator=torch.Generator().manual_seed(0))

    def run(module, dtype=torch.float32):
        return module(feats.to(dtype))

    conn.eval()
    with torch.no_grad():
        out = run(conn)
    check_shape(out, (batch, conn.tokens_per_image, conn.out_features), who, f"forward({tuple(feats.shape)})")
    check_finite(out, who, "forward")
    check_dtype_and_grads(conn, run, who)
    check_key_map(make, who, run, "connector")
    if build:
        check_builds("connector", cls, params, name=name, neighbours=neighbours)
    return conn


def check_aligner(
    cls: type, params: Any, *, in_features: int = 16, out_features: int = 24, name: str | None = None,
    tokens: int = 4, batch: int = 2, build: bool = True, neighbours: Mapping[str, dict] | None = None,
) -> nn.Module:  # fmt: skip
    """``cls(params, in_features=, out_features=)``: ``(N, K, in) -> (N, K, out)``; also with equal widths."""
    who = where_of("aligner", cls)
    params = validated_params(cls, params, who)
    for d_in in (in_features, out_features):

        def make(d_in=d_in):
            return cls(params, in_features=d_in, out_features=out_features)

        with seeded():
            aligner = make()
        assert isinstance(aligner, Aligner), f"{who}: does not satisfy vlmkit.protocols.Aligner"
        x = torch.randn(batch, tokens, d_in, generator=torch.Generator().manual_seed(0))

        def run(module, dtype=torch.float32, x=x):
            return module(x.to(dtype))

        aligner.eval()
        with torch.no_grad():
            out = run(aligner)
        check_shape(out, (batch, tokens, out_features), who, f"forward({tuple(x.shape)}) with in_features={d_in}")
        check_dtype_and_grads(aligner, run, who)
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
    who = where_of("packer", cls)
    params = validated_params(cls, params, who)

    def make():
        return cls(params, tokens_per_image=tokens_per_image)

    with seeded():
        packer = make()
    check_attrs(packer, ("image_token_id", "tokens_per_image"), who)
    assert isinstance(packer, Packer), f"{who}: does not satisfy vlmkit.protocols.Packer"
    assert packer.tokens_per_image == tokens_per_image, f"{who}: tokens_per_image={packer.tokens_per_image}, built with {tokens_per_image}"
    tok = packer.image_token_id
    ids, embeds, images = _packer_inputs(tok, tokens_per_image, hidden_size)

    def run(module, dtype=torch.float32):
        return module(ids, embeds.to(dtype), images.to(dtype), [2, 0])

    with torch.no_grad():
        out = run(packer)
    check_shape(out, tuple(embeds.shape), who, "forward(input_ids, inputs_embeds, image_tokens, [2, 0])")
    is_img = ids == tok
    assert torch.equal(out[~is_img], embeds[~is_img]), f"{who}: text positions changed (only placeholders may be replaced)"
    assert torch.equal(out[is_img], images.reshape(-1, hidden_size)), (
        f"{who}: placeholder positions do not hold the image tokens in order"
    )
    check_dtype_and_grads(packer, run, who)
    check_key_map(make, who, run, "packer")
    if build:
        check_builds("packer", cls, params, name=name, neighbours=neighbours)
    return packer


def _packer_inputs(tok: int, k: int, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids (2, 2k+3)`` (row 0: two images of ``k`` placeholders ``tok`` between text, row 1:
    text only), ``inputs_embeds (2, 2k+3, hidden_size)`` and ``image_tokens (2, k, hidden_size)``."""
    text = tok + 1
    ids = torch.tensor([[text, *[tok] * k, text, *[tok] * k, text], [text] * (2 * k + 3)])
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, ids.shape[1], hidden_size, generator=g)
    images = torch.randn(2, k, hidden_size, generator=g)
    return ids, embeds, images


def check_backbone(
    cls: type, params: Any, *, name: str | None = None, batch: int = 2, seq_len: int = 5, build: bool = True,
    neighbours: Mapping[str, dict] | None = None,
) -> nn.Module:  # fmt: skip
    """``cls(params)``: ``embed (B, T) -> (B, T, D)``, ``forward -> (B, T, D)``, ``logits -> (B, T, V)``."""
    who = where_of("backbone", cls)
    params = validated_params(cls, params, who)
    with seeded():
        bb = cls(params)
    check_attrs(bb, ("hidden_size", "vocab_size"), who)
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
        check_shape(embeds, (batch, seq_len, bb.hidden_size), who, "embed(input_ids)")
        hidden = bb(embeds, attention_mask=mask)
        check_shape(hidden, (batch, seq_len, bb.hidden_size), who, "forward(inputs_embeds, attention_mask)")
        logits = bb.logits(hidden)
        check_shape(logits, (batch, seq_len, bb.vocab_size), who, "logits(hidden)")
        check_finite(logits[:, 1:], who, "logits")
    check_dtype_and_grads(bb, run, who)
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
