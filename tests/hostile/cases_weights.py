"""Hostile checkpoints: duplicate shard tensors, a deep index, integer tensors alone and inside fused ones."""

from __future__ import annotations

import json

from .cases import Ctx, _nested, _save, _tensors, case

# ----------------------------------------------------------------------------- weights


@case("weights-tensor-in-two-shards", error="WeightLoadError", words=("stored twice", "model-00002-of-00002"))
def _(ctx: Ctx):
    import vlmkit

    folder = ctx.ckpt()
    tensors = _tensors(folder)
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    _save({k: tensors[k] for k in names[: len(names) // 2 + 1]}, folder / "model-00001-of-00002.safetensors")
    _save({k: tensors[k] for k in names[len(names) // 2 :]}, folder / "model-00002-of-00002.safetensors")
    index = {n: "model-00001-of-00002.safetensors" for n in names[: len(names) // 2]}
    index |= {n: "model-00002-of-00002.safetensors" for n in names[len(names) // 2 :]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return vlmkit.build_from_hf(folder)


@case("weights-index-deep", error="WeightLoadError", words=("model.safetensors.index.json", "nested"))
def _(ctx: Ctx):
    import vlmkit

    folder = ctx.ckpt()
    (folder / "model.safetensors.index.json").write_text(_nested(100_000))
    return vlmkit.build_from_hf(folder)


def _retype(ctx: Ctx, key_part: str, dtype):
    import vlmkit

    folder = ctx.ckpt()
    tensors = _tensors(folder)
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = tensors[key].to(dtype)
    _save(tensors, folder / "model.safetensors")
    return vlmkit.build_from_hf(folder)


@case("weights-int8-inside-fused-qkv", error="WeightLoadError", words=("q_proj", "int8", "expects a float"))
def _(ctx: Ctx):
    import torch

    return _retype(ctx, "text_model.layers.0.self_attn.q_proj.weight", torch.int8)


@case("weights-int8-plain-tensor", error="WeightLoadError", words=("embed_tokens", "int8", "expects a float"))
def _(ctx: Ctx):
    import torch

    return _retype(ctx, "text_model.embed_tokens.weight", torch.int8)


@case("weights-int64-inside-fused-gate-up", error="WeightLoadError", words=("up_proj", "int64"))
def _(ctx: Ctx):
    import torch

    return _retype(ctx, "text_model.layers.0.mlp.up_proj.weight", torch.int64)
