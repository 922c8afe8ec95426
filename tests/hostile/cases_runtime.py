"""Hostile runtime inputs: images, chat templates, NaN/inf, generation, memory and plugins."""

from __future__ import annotations

import io
import os

from .cases import TINY, Ctx, _cli, _entry_point_plugin, _png, _real_png, _save, _template, _tensors, _tiny_model, case

# ----------------------------------------------------------------------------- images


def _processor():
    import vlmkit
    from vlmkit.processor.loading import load_processor

    from .cases import PUBLISHED

    _ = vlmkit
    return load_processor(PUBLISHED)


@case("image-truncated-file", error="ProcessorError", words=("cut.png", "truncated"))
def _(ctx: Ctx):
    from vlmkit.limits import read_image_file

    return read_image_file(ctx.write("cut.png", _real_png(64)[:-40]))


@case("image-truncated-lazy-pil", error="ProcessorError", words=("cannot be decoded", "truncated"))
def _(ctx: Ctx):
    from PIL import Image

    image = Image.open(io.BytesIO(_real_png(64)[:60]))
    return _processor()(text="<image>hi", images=[image])


@case("image-decompression-bomb-file", error="ProcessorError", words=("bomb.png", "decompression bomb", "VLMKIT_MAX_IMAGE_PIXELS"))
def _(ctx: Ctx):
    from vlmkit.limits import read_image_file

    return read_image_file(ctx.write("bomb.png", _png(30000, 30000)))


@case("image-decompression-bomb-pil", error="ProcessorError", words=("12000x12000", "pixels"))
def _(ctx: Ctx):
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(_png(12000, 12000)))  # header only: no pixel decoded yet
    return _processor()(text="<image>hi", images=[image])


@case("image-huge-array", error="ProcessorError", words=("100000000x1", "pixels"))
def _(ctx: Ctx):
    import numpy as np

    return _processor()(text="<image>hi", images=[np.zeros((1, 100_000_000), dtype=np.uint8)])


@case("image-fifo", error="ProcessorError", words=("FIFO",))
def _(ctx: Ctx):
    from vlmkit.limits import read_image_file

    os.mkfifo(ctx.tmp / "pipe.png")
    return read_image_file(ctx.tmp / "pipe.png")


@case("image-not-an-image", error="ProcessorError", words=("notes.png", "not an image"))
def _(ctx: Ctx):
    from vlmkit.limits import read_image_file

    return read_image_file(ctx.write("notes.png", "just some text\n" * 10))


@case("image-bytes-bound-from-env", error="ProcessorError", words=("VLMKIT_MAX_IMAGE_BYTES",),
      env={"VLMKIT_MAX_IMAGE_BYTES": "64"})  # fmt: skip
def _(ctx: Ctx):
    from vlmkit.limits import read_image_file

    return read_image_file(ctx.write("ok.png", _real_png(64)))


@case("image-good-file", ok=True, words=("64x64",))
def _(ctx: Ctx):
    from vlmkit.limits import read_image_file

    image = read_image_file(ctx.write("ok.png", _real_png(64)))
    assert image.getpixel((3, 3)) == (200, 30, 30)
    return f"{image.width}x{image.height}"


# ----------------------------------------------------------------------------- chat templates


@case("template-string-times-huge", error="ProcessorError", words=("chat_template.jinja", "VLMKIT_MAX_TEMPLATE_OUTPUT"))
def _(ctx: Ctx):
    return _template(ctx, "{{ 'a' * 10**10 }}")


@case("template-huge-power", error="ProcessorError", words=("chat_template.jinja", "too large a power"))
def _(ctx: Ctx):
    return _template(ctx, "{{ 7 ** 100000000 }}")


@case("template-nested-ranges", error="ProcessorError", words=("steps", "VLMKIT_MAX_TEMPLATE_STEPS"))
def _(ctx: Ctx):
    return _template(ctx, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")


@case("template-namespace-doubling", error="ProcessorError", words=("output bound",))
def _(ctx: Ctx):
    return _template(ctx, "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}")


@case("template-ljust-huge", error="ProcessorError", words=("output bound",))
def _(ctx: Ctx):
    return _template(ctx, "{{ 'a'.ljust(10**11) }}")


@case("template-list-times-huge", error="ProcessorError", words=("output bound",))
def _(ctx: Ctx):
    return _template(ctx, "{{ ((range(10000)|list) * 100000)|length }}")


@case("template-filter-center-huge", error="ProcessorError", words=("output bound",))
def _(ctx: Ctx):
    return _template(ctx, "{{ 'a'|center(10**10) }}")


@case("template-filter-replace-explodes", error="ProcessorError", words=("output bound",))
def _(ctx: Ctx):
    return _template(ctx, "{{ ('a' * 100000)|replace('a', 'b' * 100000) }}")


@case("template-method-replace-explodes", error="ProcessorError", words=("output bound",))
def _(ctx: Ctx):
    return _template(ctx, "{{ ('a' * 100000).replace('a', 'b' * 1000) }}")


@case("template-format-width-huge", error="ProcessorError", words=("output bound",))
def _(ctx: Ctx):
    return _template(ctx, "{{ '%*d'|format(10**10, 1) }}")


@case("template-type-error", error="ProcessorError", words=("rejected the messages", "TypeError"))
def _(ctx: Ctx):
    return _template(ctx, "{{ 1 ** 'a' }}")


@case("template-recursive-macro", error="ProcessorError", words=("RecursionError",))
def _(ctx: Ctx):
    return _template(ctx, "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")


@case("template-reaches-python", error="ProcessorError", words=("chat_template.jinja",))
def _(ctx: Ctx):
    return _template(ctx, "{{ messages.__class__.__mro__[1].__subclasses__() }}")


@case("template-raise-exception", error="ProcessorError", words=("rejected the messages", "no system turns"))
def _(ctx: Ctx):
    return _template(ctx, "{{ raise_exception('no system turns') }}")


@case("template-time-bound-from-env", error="ProcessorError", words=("VLMKIT_MAX_TEMPLATE_SECONDS",),
      env={"VLMKIT_MAX_TEMPLATE_SECONDS": "0.05", "VLMKIT_MAX_TEMPLATE_STEPS": "1000000000"})  # fmt: skip
def _(ctx: Ctx):
    return _template(ctx, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")


@case("template-published-renders", ok=True, words=("User:", "Assistant:"))
def _(ctx: Ctx):
    text = _processor().apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                            add_generation_prompt=True)  # fmt: skip
    assert text.rstrip().endswith("Assistant:") and "hi" in text
    return text


# ----------------------------------------------------------------------------- NaN / inf in weights


def _poison(ctx: Ctx, value: float) -> str:
    folder = ctx.ckpt()
    tensors = _tensors(folder)
    key = next(k for k in sorted(tensors) if "text_model.layers.0.mlp.down_proj.weight" in k)
    tensors[key][0, 0] = value
    _save(tensors, folder / "model.safetensors")
    return str(folder)


@case("weights-nan-check-finite", error="WeightLoadError", words=("mlp.down_proj.weight", "1 NaN", "check"))
def _(ctx: Ctx):
    import vlmkit

    return vlmkit.build_from_hf(_poison(ctx, float("nan")), check_finite=True)


@case("weights-nan-default-loads", ok=True, words=("loaded",))
def _(ctx: Ctx):
    import vlmkit

    model = vlmkit.build_from_hf(_poison(ctx, float("nan")))  # check_finite is opt-in
    assert any(p.isnan().any() for p in model.parameters())
    return "loaded"


@case("weights-inf-inspect-check", cli=True, words=("1 inf", "down_proj"))
def _(ctx: Ctx):
    return _cli("inspect", _poison(ctx, float("inf")), "--check")


@case("weights-clean-inspect-check", ok=True, words=("rc=0", "finite"))
def _(ctx: Ctx):
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        text = _cli("inspect", str(ctx.ckpt()), "--check")
    assert text.startswith("rc=0"), text
    return text + out.getvalue()


# ----------------------------------------------------------------------------- generation and memory


@case("generate-max-new-tokens-1e9", error="GenerationError", words=("1000000000", "max_new_tokens <="))
def _(ctx: Ctx):
    import torch

    from vlmkit.generation import generate

    return generate(_tiny_model(), torch.randint(3, 80, (1, 10)), max_new_tokens=10**9)


@case("generate-nan-logits", error="GenerationError", words=("NaN",))
def _(ctx: Ctx):
    import torch

    from vlmkit.generation import generate

    model = _tiny_model()
    with torch.no_grad():
        model.backbone.lm_head.weight.fill_(float("nan"))
    return generate(model, torch.randint(3, 80, (1, 10)), max_new_tokens=5)


@case("generate-stop-at-once-small-cache", ok=True, words=("capacity",))
def _(ctx: Ctx):
    import torch

    from vlmkit.generation import generate
    from vlmkit.kv_cache import GROW_STEP

    model = _tiny_model()
    made = []
    real = model.backbone.new_cache
    model.backbone.new_cache = lambda *a, **k: made.append(real(*a, **k)) or made[-1]
    ids = torch.randint(3, 80, (1, 7), generator=torch.Generator().manual_seed(1))
    first = generate(model, ids, max_new_tokens=1, eos_token_id=[])[:, -1]
    out = generate(model, ids, max_new_tokens=4000, eos_token_id=first.tolist())
    assert out.shape == (1, 8) and made[-1].capacity <= 7 + GROW_STEP
    return f"capacity {made[-1].capacity}"


@case("memory-guard-under-ulimit", error="SpecError", words=("GiB in float32", "ulimit -v"))
def _(ctx: Ctx):
    import vlmkit

    big = {**TINY, "backbone": {**TINY["backbone"], "vocab_size": 300_000, "hidden_size": 4096}}
    return vlmkit.build(big, load_weights=False)  # 1.2 G params = 4.9 GB: over this child's RLIMIT_AS


# ----------------------------------------------------------------------------- plugins


_EXITS_AT_IMPORT = "import sys\nsys.exit(3)\n"

_EXITS_IN_HOOK = """
from vlmkit.hookspecs import hookimpl

@hookimpl
def vlmkit_register_components(registry):
    raise SystemExit("plugin says bye")
"""

_BAD_VALIDATOR = """
from pydantic import BaseModel, model_validator
from vlmkit.hookspecs import hookimpl
from vlmkit.components.mlp_connector import MlpConnector

class Params(BaseModel):
    size: int = 1

    @model_validator(mode="after")
    def _check(self):
        {action}

class Crashy(MlpConnector):
    Params = Params

@hookimpl
def vlmkit_register_components(registry):
    registry.add_connector("crashy", Crashy)
"""


@case("plugin-sys-exit-at-import", ok=True, words=("SystemExit", "still alive"))
def _(ctx: Ctx):
    from vlmkit import plugins

    _entry_point_plugin(ctx, "exit_plugin", _EXITS_AT_IMPORT)
    failed = {f.name: f.error for f in plugins.failures()}
    assert "exit_plugin" in failed and "navit" in plugins.get_registry().names("vision_tower")
    return f"{failed['exit_plugin']}; still alive"


@case("plugin-sys-exit-in-hook", ok=True, words=("plugin says bye",))
def _(ctx: Ctx):
    from vlmkit import plugins

    _entry_point_plugin(ctx, "hook_exit_plugin", _EXITS_IN_HOOK)
    failed = {f.name: f.error for f in plugins.failures()}
    assert "hook_exit_plugin" in failed
    return failed["hook_exit_plugin"]


@case("plugin-failed-listed-by-cli", ok=True, words=("failed", "exit_plugin"))
def _(ctx: Ctx):
    import contextlib

    _entry_point_plugin(ctx, "exit_plugin", _EXITS_AT_IMPORT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        text = _cli("plugins")
    assert text.startswith("rc=0"), text
    return out.getvalue() + text


@case("plugin-failed-then-used", error="PluginError", words=("'exit_plugin'", "failed to load", "SystemExit"))
def _(ctx: Ctx):
    import vlmkit

    _entry_point_plugin(ctx, "exit_plugin", _EXITS_AT_IMPORT)
    from vlmkit.spec import validate_spec

    return validate_spec({**TINY, "connector": {"name": "exit_connector"}})


def _validator_plugin(action: str):
    import types

    import vlmkit
    from vlmkit.plugins import register_plugin

    module = types.ModuleType("crashy_plugin")
    exec(_BAD_VALIDATOR.replace("{action}", action), module.__dict__)  # noqa: S102 - the test's own plugin source
    register_plugin(module, name="crashy_plugin")
    from vlmkit.spec import validate_spec

    return validate_spec({**TINY, "connector": {"name": "crashy"}})


@case("plugin-validator-raises-runtime-error", error="PluginError", words=("'crashy_plugin'", "RuntimeError", "validating"))
def _(ctx: Ctx):
    return _validator_plugin("raise RuntimeError('validator broke')")


@case("plugin-validator-calls-sys-exit", error="PluginError", words=("'crashy_plugin'", "SystemExit"))
def _(ctx: Ctx):
    return _validator_plugin("raise SystemExit(4)")
