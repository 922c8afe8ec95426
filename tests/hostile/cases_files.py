"""Hostile files: YAML, JSON side files, paths and weights."""

from __future__ import annotations

import json
import os

from .cases import TINY, Ctx, _cli, _edit_json, _laughs, _nested, _yaml, case

# ----------------------------------------------------------------------------- YAML


@case("yaml-billion-laughs", error="SpecError", words=("billion laughs", "VLMKIT_MAX_YAML_NODES", "bomb.yaml"))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.load_yaml(ctx.write("bomb.yaml", _laughs()))


@case("yaml-billion-laughs-cli-inspect", cli=True, words=("billion laughs",))
def _(ctx: Ctx):
    return _cli("inspect", str(ctx.write("bomb.yaml", _laughs())))


@case("yaml-billion-laughs-build", error="SpecError", words=("billion laughs",))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.build(ctx.write("bomb.yaml", _laughs()), load_weights=False)


@case("yaml-duplicate-top-key", error="SpecError", words=("'backbone'", "appears twice", "dup.yaml"))
def _(ctx: Ctx):
    import vlmkit

    text = _yaml(TINY) + "backbone: {name: llama}\n"
    return vlmkit.load_yaml(ctx.write("dup.yaml", text))


@case("yaml-duplicate-nested-key", error="SpecError", words=("'hidden_size'", "appears twice", "lines"))
def _(ctx: Ctx):
    import vlmkit

    text = _yaml(TINY).replace("  hidden_size: 48\n", "  hidden_size: 48\n  hidden_size: 64\n")
    return vlmkit.load_yaml(ctx.write("dup.yaml", text))


@case("yaml-recursive-anchor", error="SpecError", words=("refers to itself",))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.load_yaml(ctx.write("loop.yaml", _yaml(TINY) + "freeze: &x [backbone, *x]\n"))


@case("yaml-fifo", error="SourceNotFoundError", words=("FIFO", "regular file"))
def _(ctx: Ctx):
    import vlmkit

    path = ctx.tmp / "model.yaml"
    os.mkfifo(path)
    return vlmkit.load_yaml(path)


@case("yaml-fifo-cli-inspect", cli=True, words=("FIFO",))
def _(ctx: Ctx):
    path = ctx.tmp / "model.yaml"
    os.mkfifo(path)
    return _cli("inspect", str(path))


@case("yaml-char-device", error="SourceNotFoundError", words=("device", "regular file"))
def _(ctx: Ctx):
    import vlmkit

    path = ctx.tmp / "zero.yaml"
    path.symlink_to("/dev/zero")
    return vlmkit.load_yaml(path)


@case("yaml-too-big", error="SpecError", words=("over the bound", "VLMKIT_MAX_YAML_BYTES", "big.yaml"))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.load_yaml(ctx.write("big.yaml", _yaml(TINY) + "# " + "x" * (5 * 1024 * 1024) + "\n"))


@case("yaml-bound-from-env", error="SpecError", words=("over the bound of 100 bytes", "VLMKIT_MAX_YAML_BYTES"),
      env={"VLMKIT_MAX_YAML_BYTES": "100"})  # fmt: skip
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.load_yaml(ctx.write("m.yaml", _yaml(TINY)))


@case("yaml-bad-env-value", error="VlmkitError", words=("VLMKIT_MAX_YAML_BYTES='lots'", "positive number"),
      env={"VLMKIT_MAX_YAML_BYTES": "lots"})  # fmt: skip
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.load_yaml(ctx.write("m.yaml", _yaml(TINY)))


@case("yaml-deep-nesting", error="SpecError", words=("deep", "deep.yaml"))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.load_yaml(ctx.write("deep.yaml", "freeze: " + "[" * 50_000 + "]" * 50_000 + "\n"))


@case("yaml-aliases-within-bound", ok=True, words=("round trip equal",))
def _(ctx: Ctx):
    import vlmkit

    text = _yaml(TINY) + "freeze: &f [backbone]\ntokenizer: &t some/repo\nweights: {backbone: *t}\n"
    spec = vlmkit.load_yaml(ctx.write("ok.yaml", text))
    again = vlmkit.load_yaml(ctx.write("again.yaml", vlmkit.dump_yaml(spec)))
    assert again.to_dict() == spec.to_dict() and spec.freeze == ["backbone"]
    return "round trip equal"


@case("spec-dict-shared-references", error="SpecError", words=("once shared ones are counted",))
def _(ctx: Ctx):
    import vlmkit

    laugh: object = ["backbone"]
    for _ in range(30):
        laugh = [laugh, laugh]
    from vlmkit.spec import validate_spec

    return validate_spec({**TINY, "freeze": laugh})


@case("yaml-python-tag", error="SpecError", words=("python/object", "never run"))
def _(ctx: Ctx):
    import vlmkit

    text = _yaml(TINY) + "tokenizer: !!python/object/apply:os.system ['touch PWNED']\n"
    try:
        return vlmkit.load_yaml(ctx.write("tag.yaml", text))
    finally:
        assert not (ctx.tmp / "PWNED").exists()


@case("yaml-strict-bool-int", error="SpecError", words=("backbone.num_hidden_layers", "boolean true"))
def _(ctx: Ctx):
    import vlmkit

    text = _yaml(TINY).replace("num_hidden_layers: 1\n  num_attention_heads: 4\n  num_key_value_heads",
                               "num_hidden_layers: true\n  num_attention_heads: 4\n  num_key_value_heads")  # fmt: skip
    return vlmkit.build(ctx.write("m.yaml", text), load_weights=False)


@case("yaml-strict-quoted-int", error="SpecError", words=("vision_tower.patch_size", "'8'", "without quotes"))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.build(ctx.write("m.yaml", _yaml(TINY).replace("patch_size: 8", "patch_size: '8'")), load_weights=False)


@case("yaml-nan-rope-theta", error="SpecError", words=("backbone.rope_theta", "nan"))
def _(ctx: Ctx):
    import vlmkit

    text = _yaml(TINY).replace("max_position_embeddings: 4096", "max_position_embeddings: 4096\n  rope_theta: .nan")
    return vlmkit.build(ctx.write("m.yaml", text), load_weights=False)


@case("yaml-inf-rope-theta", error="SpecError", words=("backbone.rope_theta", "inf"))
def _(ctx: Ctx):
    import vlmkit

    text = _yaml(TINY).replace("max_position_embeddings: 4096", "max_position_embeddings: 4096\n  rope_theta: .inf")
    return vlmkit.build(ctx.write("m.yaml", text), load_weights=False)


@case("recipe-duplicate-key", error="RecipeError", words=("appears twice", "recipe.yaml"))
def _(ctx: Ctx):
    from vlmkit.train.recipe import load_recipe

    return load_recipe(ctx.write("recipe.yaml", "model: a.yaml\nmodel: b.yaml\n"))


# ----------------------------------------------------------------------------- paths


@case("path-5000-chars-build", error="SourceNotFoundError", words=("5,005 characters", "VLMKIT_MAX_PATH_CHARS"))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.build("a" * 5000 + ".yaml")


@case("path-5000-chars-build-from-hf", error="SourceNotFoundError", words=("characters long",))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.build_from_hf("/tmp/" + "b" * 5000)


@case("path-5000-chars-processor", error="SourceNotFoundError", words=("characters long",))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.load_processor("/tmp/" + "c" * 5000)


@case("path-long-name", error="SourceNotFoundError", words=("255",))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.load_yaml(str(ctx.tmp / ("n" * 300 + ".yaml")))


@case("path-5000-chars-cli", cli=True, words=("characters long",))
def _(ctx: Ctx):
    return _cli("inspect", "/tmp/" + "d" * 5000)


# ----------------------------------------------------------------------------- side files


def _hf(ctx: Ctx, edit, name: str = "config.json", **build):
    import vlmkit

    folder = ctx.ckpt()
    _edit_json(folder / name, edit) if callable(edit) else (folder / name).write_text(edit)
    return vlmkit.build_from_hf(folder, **build)


def _processor(ctx: Ctx, name: str, edit):
    import vlmkit

    folder = ctx.published()
    _edit_json(folder / name, edit) if callable(edit) else (folder / name).write_text(edit)
    return vlmkit.load_processor(folder)


@case("config-deep-json-recursion", error="SpecError", words=("config.json", "nested"))
def _(ctx: Ctx):
    return _hf(ctx, _nested(200_000))


@case("config-deep-json-over-bound", error="SpecError", words=("config.json", "64 levels", "VLMKIT_MAX_JSON_DEPTH"))
def _(ctx: Ctx):
    return _hf(ctx, lambda c: c.update(junk=json.loads(_nested(100))))


@case("config-json-bound-from-env", error="SpecError", words=("config.json", "VLMKIT_MAX_JSON_BYTES"),
      env={"VLMKIT_MAX_JSON_BYTES": "200"})  # fmt: skip
def _(ctx: Ctx):
    return _hf(ctx, lambda c: None)


@case("config-nan-literal", error="SpecError", words=("config.json", "NaN is not a JSON number"))
def _(ctx: Ctx):
    folder = ctx.ckpt()
    text = (folder / "config.json").read_text().replace('"rope_theta": 50000.0', '"rope_theta": NaN')
    assert "NaN" in text
    return _hf(ctx, text)


@case("config-inf-rope-theta", error="SpecError", words=("config.json", "rope_theta", "inf"))
def _(ctx: Ctx):
    folder = ctx.ckpt()
    text = (folder / "config.json").read_text().replace('"rope_theta": 50000.0', '"rope_theta": 1e999')
    return _hf(ctx, text)


@case("config-bool-hidden-size", error="SpecError", words=("config.json", "text_config.hidden_size", "boolean true"))
def _(ctx: Ctx):
    return _hf(ctx, lambda c: c["text_config"].update(hidden_size=True))


@case("config-string-layers", error="SpecError", words=("config.json", "num_hidden_layers", "'2'"))
def _(ctx: Ctx):
    return _hf(ctx, lambda c: c["text_config"].update(num_hidden_layers="2"))


@case("config-float-patch-size", error="SpecError", words=("config.json", "patch_size", "8.0"))
def _(ctx: Ctx):
    return _hf(ctx, lambda c: c["vision_config"].update(patch_size=8.0))


@case("config-huge-width", error="SpecError", words=("config.json", "not a plausible size", "hidden_size"))
def _(ctx: Ctx):
    return _hf(ctx, lambda c: c["text_config"].update(hidden_size=10**30))


@case("config-huge-vocab", error="SpecError", words=("config.json", "not a plausible size"))
def _(ctx: Ctx):
    return _hf(ctx, lambda c: (c["text_config"].update(vocab_size=2**40), c.update(vocab_size=2**40)))


@case("config-text-bert", error="SpecError", words=("'bert'", "is_decoder"))
def _(ctx: Ctx):
    return _hf(ctx, lambda c: c["text_config"].update(model_type="bert"))


@case("config-text-t5", error="SpecError", words=("'t5'", "not a causal language model"))
def _(ctx: Ctx):
    return _hf(ctx, lambda c: c["text_config"].update(model_type="t5"))


@case("config-is-fifo", error="SourceNotFoundError", words=("config.json", "not a file"))
def _(ctx: Ctx):
    import vlmkit

    folder = ctx.ckpt()
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    return vlmkit.build_from_hf(folder)


@case("generation-config-deep", error="SpecError", words=("generation_config.json", "nested"))
def _(ctx: Ctx):
    return _processor(ctx, "generation_config.json", _nested(100_000))


@case("preprocessor-config-deep", error="SpecError", words=("preprocessor_config.json", "nested"))
def _(ctx: Ctx):
    return _processor(ctx, "preprocessor_config.json", _nested(100_000))


@case("tokenizer-config-deep", error="SpecError", words=("tokenizer_config.json", "nested"))
def _(ctx: Ctx):
    return _processor(ctx, "tokenizer_config.json", "[" * 100_000 + "]" * 100_000)


@case("rescale-factor-string", error="SpecError", words=("preprocessor_config.json", "rescale_factor", "'abc'"))
def _(ctx: Ctx):
    return _processor(ctx, "preprocessor_config.json", lambda c: c.update(rescale_factor="abc"))


@case("rescale-factor-bool", error="SpecError", words=("rescale_factor", "True"))
def _(ctx: Ctx):
    return _processor(ctx, "preprocessor_config.json", lambda c: c.update(rescale_factor=True))


@case("image-std-inf", error="SpecError", words=("preprocessor_config.json", "image_std", "inf"))
def _(ctx: Ctx):
    folder = ctx.published()
    path = folder / "preprocessor_config.json"
    data = json.loads(path.read_text())
    data["image_std"] = "STD"
    path.write_text(json.dumps(data).replace('"STD"', "[0.5, 1e999, 0.5]"))
    import vlmkit

    return vlmkit.load_processor(folder)


@case("image-std-nan-literal", error="SpecError", words=("preprocessor_config.json", "NaN"))
def _(ctx: Ctx):
    folder = ctx.published()
    path = folder / "preprocessor_config.json"
    data = json.loads(path.read_text())
    data["image_std"] = "STD"
    path.write_text(json.dumps(data).replace('"STD"', "[NaN, 0.5, 0.5]"))
    import vlmkit

    return vlmkit.load_processor(folder)


@case("chat-template-file-too-big", error="SpecError", words=("chat_template.jinja", "VLMKIT_MAX_TEMPLATE_BYTES"))
def _(ctx: Ctx):
    import vlmkit

    folder = ctx.published()
    (folder / "chat_template.jinja").write_text("{# " + "x" * (2 * 1024 * 1024) + " #}")
    return vlmkit.load_processor(folder)
