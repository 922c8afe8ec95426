"""Bad input of every kind is a ``vlmkit.errors`` error naming the value and where it came from.

Each row of ``CASES`` damages one thing -- a config.json, a YAML file, a safetensors file, a
build argument or a forward tensor -- and says which error class must come out and which
words its message must hold (the bad value, the file or key path, what was expected). No row
may end in a raw torch / json / yaml / pydantic exception.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

import vlmkit
from vlmkit.errors import (
    PackingError,
    ProcessorError,
    SourceNotFoundError,
    SpecError,
    UnknownComponentError,
    VlmkitError,
    WeightLoadError,
)

from vlmkit.protocols import SLOTS

from ._tiny_ckpt import IMAGE_TOKEN, SHAPE, batch, copy_checkpoint, tiny_checkpoint

#: A tiny YAML-form spec (builds in milliseconds).
TINY = {
    "vision_tower": {"name": "navit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "image_size": 48, "patch_size": 8},
    "connector": {"name": "idefics3", "scale_factor": 2},
    "packer": {"name": "image_packer", "image_token_id": 290},
    "backbone": {"name": "llama", "vocab_size": 300, "hidden_size": 48, "intermediate_size": 104,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2},
}  # fmt: skip


@dataclass
class Ctx:
    """What a case may use: a scratch folder, a private checkpoint copy, the built tiny model."""

    tmp: Path
    model_factory: Callable[[], vlmkit.VLM]
    _ckpt: Path | None = field(default=None)

    @property
    def ckpt(self) -> Path:
        if self._ckpt is None:
            self._ckpt = copy_checkpoint(self.tmp / "ckpt")
        return self._ckpt

    @property
    def model(self):
        return self.model_factory()


# ---------------------------------------------------------------------------- helpers
def _config(edit: Callable[[dict], object], *, build: bool = False) -> Callable[[Ctx], object]:
    def run(ctx: Ctx):
        path = ctx.ckpt / "config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
        return vlmkit.build_from_hf(ctx.ckpt, load_weights=False) if build else vlmkit.spec_from_hf(ctx.ckpt)

    return run


def _file(name: str, content: str | bytes | None, *, build: bool = True) -> Callable[[Ctx], object]:
    """Overwrite (``None``: delete) one file of the checkpoint, then build it."""

    def run(ctx: Ctx):
        path = ctx.ckpt / name
        if content is None:
            path.unlink()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return vlmkit.build_from_hf(ctx.ckpt) if build else vlmkit.spec_from_hf(ctx.ckpt)

    return run


def _tensors(edit: Callable[[dict], object]) -> Callable[[Ctx], object]:
    def run(ctx: Ctx):
        from safetensors.torch import load_file, save_file

        path = ctx.ckpt / "model.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
        return vlmkit.build_from_hf(ctx.ckpt)

    return run


def _bytes(edit: Callable[[bytes], bytes]) -> Callable[[Ctx], object]:
    def run(ctx: Ctx):
        path = ctx.ckpt / "model.safetensors"
        path.write_bytes(edit(path.read_bytes()))
        return vlmkit.build_from_hf(ctx.ckpt)

    return run


def _bad_header(data: bytes) -> bytes:
    header = b'{"model.text_model.norm.weight": {"dtype": "F32", nonsense'
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + int.from_bytes(data[:8], "little") :]


def _index(weight_map: dict) -> Callable[[Ctx], object]:
    def run(ctx: Ctx):
        (ctx.ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return vlmkit.build_from_hf(ctx.ckpt)

    return run


def _pickle_only(ctx: Ctx):
    (ctx.ckpt / "model.safetensors").unlink()
    (ctx.ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    return vlmkit.build_from_hf(ctx.ckpt)


def _yaml(edit: Callable[[dict], object] | str | bytes, *, build: bool = False, weights: bool = False):
    def run(ctx: Ctx):
        path = ctx.tmp / "bad.yaml"
        if isinstance(edit, bytes):
            path.write_bytes(edit)
        elif isinstance(edit, str):
            path.write_text(edit)
        else:
            data = json.loads(json.dumps(TINY))
            edit(data)
            path.write_text(yaml.safe_dump(data))
        return vlmkit.build(path, load_weights=weights) if build else vlmkit.load_yaml(path)

    return run


def _build(**kwargs) -> Callable[[Ctx], object]:
    return lambda ctx: vlmkit.build_from_hf(tiny_checkpoint(), **kwargs)


def _forward(edit: Callable[[dict], object]) -> Callable[[Ctx], object]:
    def run(ctx: Ctx):
        ids, mask, pixels, pmask = batch()
        inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "pixel_attention_mask": pmask}
        edit(inputs)
        with torch.no_grad():
            return ctx.model(**inputs)

    return run


def _set(key: str, fn: Callable) -> Callable[[dict], None]:
    return lambda inputs: inputs.__setitem__(key, fn(inputs[key]))


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Ctx], object]
    error: type[VlmkitError]
    needles: tuple[str, ...]
    key_path: str | None = None


CASES = [
    # -- config.json / spec_from_hf ------------------------------------------------------
    Case("config-not-json", _file("config.json", "{not json", build=False), SpecError, ("config.json", "not valid JSON")),
    Case("config-not-utf8", _file("config.json", b"\xff\xfe\x00{", build=False), SpecError, ("config.json", "not valid JSON")),
    Case("config-not-a-mapping", _file("config.json", "[1, 2]", build=False), SpecError, ("config.json", "JSON object", "list")),
    Case("config-missing", _file("config.json", None, build=False), SourceNotFoundError, ("config.json", "does not exist")),
    Case("config-missing-text-section", _config(lambda c: c.pop("text_config")), SpecError,
         ("config.json", "missing section", "text_config"), key_path="text_config"),
    Case("config-vision-section-not-mapping", _config(lambda c: c.update(vision_config=[1, 2])), SpecError,
         ("config.json", "mapping", "list"), key_path="vision_config"),
    Case("config-unknown-model-type", _config(lambda c: c.update(model_type="blip9")), SpecError,
         ("config.json", "'blip9'", "no installed plugin"), key_path="model_type"),
    Case("config-model-type-not-a-string", _config(lambda c: c.update(model_type=["idefics3"])), SpecError,
         ("config.json", "['idefics3']", "string"), key_path="model_type"),
    Case("config-scale-does-not-divide-grid", _config(lambda c: c.update(scale_factor=4)), SpecError,
         ("config.json", "scale_factor 4", "6x6", "valid scales"), key_path="scale_factor"),
    Case("config-scale-not-int", _config(lambda c: c.update(scale_factor=2.5)), SpecError,
         ("config.json", "2.5", "positive integer"), key_path="scale_factor"),
    Case("config-image-token-outside-vocab", _config(lambda c: c.update(image_token_id=5000)), SpecError,
         ("config.json", "5000", "outside the vocabulary"), key_path="image_token_id"),
    Case("config-negative-width", _config(lambda c: c["text_config"].update(hidden_size=-48)), SpecError,
         ("config.json", "-48", "greater than 0"), key_path="text_config.hidden_size"),
    Case("config-heads-do-not-divide-width", _config(lambda c: c["vision_config"].update(num_attention_heads=5)),
         SpecError, ("config.json", "hidden_size=32", "num_attention_heads=5"), key_path="vision_config"),
    Case("config-kv-heads-contradict-heads", _config(lambda c: c["text_config"].update(num_key_value_heads=3)),
         SpecError, ("config.json", "num_key_value_heads=3", "must divide"), key_path="text_config"),
    Case("config-huge-width-not-divisible", _config(lambda c: c["vision_config"].update(hidden_size=10**30 + 1)),
         SpecError, ("config.json", "hidden_size=1000000000000000000000000000001", "small valid choices"),
         key_path="vision_config"),
    Case("config-huge-grid-scale-does-not-divide",
         _config(lambda c: (c.update(scale_factor=5), c["vision_config"].update(image_size=8 * (10**12 + 1)))),
         SpecError, ("config.json", "scale_factor 5 does not divide", "valid scales"), key_path="scale_factor"),
    Case("config-absurd-depth", _config(lambda c: c["text_config"].update(num_hidden_layers=10**9), build=True),
         SpecError, ("config.json", "1,000,000,000 layers"), key_path="text_config.num_hidden_layers"),
    Case("config-vocab-contradiction", _config(lambda c: c.update(vocab_size=999)), SpecError,
         ("config.json", "999", "text_config.vocab_size"), key_path="vocab_size"),
    Case("processor-config-seq-len-not-int", _file("processor_config.json", '{"image_seq_len": "9"}', build=False),
         SpecError, ("processor_config.json", "'9'", "integer"), key_path="image_seq_len"),
    Case("config-absurdly-large-model", _config(lambda c: c["text_config"].update(intermediate_size=10**9, hidden_size=8192), build=True),
         SpecError, ("config.json", "GiB", "memory", "intermediate_size"), key_path=None),
    Case("config-size-overflow", _config(lambda c: c["text_config"].update(intermediate_size=10**18, hidden_size=10**6), build=True),
         SpecError, ("config.json", "not a plausible size"), key_path="text_config.intermediate_size"),
    # -- YAML ------------------------------------------------------------------------------
    Case("yaml-not-yaml", _yaml("vision_tower: [unclosed"), SpecError, ("bad.yaml", "not valid YAML")),
    Case("yaml-python-tag-never-runs", _yaml("vision_tower: !!python/object/apply:os.system ['touch PWNED']\n"),
         SpecError, ("bad.yaml", "not valid YAML", "python/object/apply")),
    Case("yaml-empty-file", _yaml(""), SpecError, ("bad.yaml", "empty file")),
    Case("yaml-list-at-top", _yaml("- a\n- b\n"), SpecError, ("bad.yaml", "mapping", "list")),
    Case("yaml-unknown-key", _yaml(lambda d: d["backbone"].update(hidden_sizee=48)), SpecError,
         ("bad.yaml", "unknown key"), key_path="backbone.hidden_sizee"),
    Case("yaml-unknown-top-level-key", _yaml(lambda d: d.update(visoin_tower={})), SpecError,
         ("bad.yaml", "unknown key"), key_path="visoin_tower"),
    Case("yaml-wrong-type", _yaml(lambda d: d["connector"].update(scale_factor="four")), SpecError,
         ("bad.yaml", "'four'", "integer"), key_path="connector.scale_factor"),
    Case("yaml-null-value", _yaml(lambda d: d["backbone"].update(num_hidden_layers=None)), SpecError,
         ("bad.yaml", "None", "integer"), key_path="backbone.num_hidden_layers"),
    Case("yaml-slot-is-a-list", _yaml(lambda d: d.update(connector=["idefics3"])), SpecError,
         ("bad.yaml", "['idefics3']", "mapping"), key_path="connector"),
    Case("yaml-missing-section", _yaml(lambda d: d.pop("backbone")), SpecError, ("bad.yaml", "required"), key_path="backbone"),
    Case("yaml-unknown-component", _yaml(lambda d: d["vision_tower"].update(name="sigllip")), UnknownComponentError,
         ("bad.yaml", "vision_tower.name", "'sigllip'", "Did you mean 'siglip'")),
    Case("yaml-freeze-unknown-slot", _yaml(lambda d: d.update(freeze=["tower"])), SpecError,
         ("bad.yaml", "'tower'", "slots are"), key_path="freeze"),
    Case("yaml-tokens-per-image-contradiction", _yaml(lambda d: d["packer"].update(tokens_per_image=81), build=True),
         SpecError, ("bad.yaml", "81", "connector makes 9"), key_path="packer.tokens_per_image"),
    Case("yaml-image-token-outside-vocab", _yaml(lambda d: d["packer"].update(image_token_id=300), build=True),
         SpecError, ("bad.yaml", "300", "vocab_size 300"), key_path="packer.image_token_id"),
    Case("yaml-path-is-a-folder", lambda ctx: vlmkit.build(ctx.tmp, load_weights=False), SourceNotFoundError,
         ("is a folder", "build_from_hf")),
    Case("yaml-missing-file", lambda ctx: vlmkit.build(ctx.tmp / "nope.yaml"), SourceNotFoundError, ("nope.yaml",)),
    Case("yaml-weights-folder-missing", _yaml(lambda d: d.update(weights="no-such-ckpt"), build=True, weights=True),
         SourceNotFoundError, ("bad.yaml: weights", "'no-such-ckpt'", "no folder")),
    # -- weights ---------------------------------------------------------------------------
    Case("weights-missing-tensor", _tensors(lambda t: t.pop("model.text_model.norm.weight")), WeightLoadError,
         ("backbone", "1 missing", "model.text_model.norm.weight", "strict=False")),
    Case("weights-unexpected-tensor", _tensors(lambda t: t.update({"model.extra.weight": torch.zeros(2)})),
         WeightLoadError, ("1 unexpected", "model.extra.weight")),
    Case("weights-mis-shaped", _tensors(lambda t: t.update({"model.text_model.norm.weight": torch.zeros(7)})),
         WeightLoadError, ("mis-shaped", "model.text_model.norm.weight", "(7,)", "(48,)")),
    Case("weights-fused-part-mis-shaped",
         _tensors(lambda t: t.update({"model.text_model.layers.0.self_attn.k_proj.weight": torch.zeros(5, 48)})),
         WeightLoadError, ("mis-shaped", "qkv_proj", "(5, 48)")),
    Case("weights-scalar-where-matrix-expected",
         _tensors(lambda t: t.update({"model.text_model.layers.0.mlp.up_proj.weight": torch.tensor(1.0)})),
         WeightLoadError, ("mis-shaped", "gate_up_proj")),
    Case("weights-wrong-dtype",
         _tensors(lambda t: t.update({"model.text_model.norm.weight": torch.zeros(48, dtype=torch.int32)})),
         WeightLoadError, ("wrong dtype", "model.text_model.norm.weight", "int32")),
    Case("safetensors-cut-in-half", _bytes(lambda b: b[: len(b) // 2]), WeightLoadError,
         ("model.safetensors", "not a readable safetensors file", "truncated")),
    Case("safetensors-header-garbage", _bytes(lambda b: b"\xff" * 16 + b[16:]), WeightLoadError,
         ("model.safetensors", "not a readable safetensors file")),
    Case("safetensors-header-not-json", _bytes(_bad_header), WeightLoadError, ("model.safetensors", "not a readable")),
    Case("safetensors-empty-file", _bytes(lambda b: b""), WeightLoadError, ("model.safetensors", "not a readable")),
    Case("index-names-missing-shard", _index({"model.text_model.norm.weight": "model-00002-of-00002.safetensors"}),
         WeightLoadError, ("model.safetensors.index.json", "model-00002-of-00002.safetensors", "not in the folder")),
    Case("index-escapes-folder", _index({"model.text_model.norm.weight": "../../etc/model.safetensors"}),
         WeightLoadError, ("model.safetensors.index.json", "../../etc/model.safetensors", "inside the checkpoint folder")),
    Case("index-not-json", _file("model.safetensors.index.json", "{oops"), WeightLoadError,
         ("model.safetensors.index.json", "not a valid safetensors index")),
    Case("index-names-pickle-shard", _index({"model.text_model.norm.weight": "pytorch_model-00001.bin"}),
         WeightLoadError, ("pytorch_model-00001.bin", "never unpickles")),
    Case("weights-pickle-only", _pickle_only, WeightLoadError, ("pytorch_model.bin", "pickle", "safetensors")),
    Case("weights-none-at-all", _file("model.safetensors", None), WeightLoadError, ("no weights", "load_weights=False")),
    # -- sources -----------------------------------------------------------------------------
    Case("folder-does-not-exist", lambda ctx: vlmkit.build_from_hf(ctx.tmp / "no" / "such"), SourceNotFoundError,
         ("no folder", "no/such")),
    Case("repo-id-offline", lambda ctx: vlmkit.build_from_hf("someone/not-cached-model"), SourceNotFoundError,
         ("someone/not-cached-model", "cannot be reached", "offline")),
    Case("repo-id-invalid", lambda ctx: vlmkit.spec_from_hf("some one/bad name!"), SourceNotFoundError,
         ("some one/bad name!", "not a Hub repo id")),
    Case("source-not-a-path", lambda ctx: vlmkit.build_from_hf(None), SourceNotFoundError, ("NoneType", "repo id")),
    Case("source-empty-string", lambda ctx: vlmkit.spec_from_hf(""), SourceNotFoundError, ("empty string",)),
    Case("source-is-a-file", lambda ctx: vlmkit.spec_from_hf(ctx.ckpt / "config.json"), SourceNotFoundError,
         ("config.json", "is a file, not a checkpoint folder")),
    Case("build-not-a-spec", lambda ctx: vlmkit.build(42), SourceNotFoundError, ("int", "42", "VLMSpec")),
    # -- build arguments -------------------------------------------------------------------
    Case("dtype-unknown-name", _build(dtype="float64x"), SpecError, ("'float64x'", "bfloat16"), key_path="dtype"),
    Case("dtype-not-floating", _build(dtype=torch.int64), SpecError, ("torch.int64", "floating"), key_path="dtype"),
    Case("dtype-wrong-type", _build(dtype=16), SpecError, ("int", "16"), key_path="dtype"),
    Case("device-bad-name", _build(device="gpu0"), VlmkitError, ("'gpu0'", "not a device")),
    Case("device-absent-gpu-index", _build(device="cuda:99"), VlmkitError, ("cuda:99",)),
    Case("device-meta", _build(device="meta"), VlmkitError, ("meta", "cannot run")),
    # -- forward ---------------------------------------------------------------------------
    Case("placeholders-more-than-images",
         _forward(lambda i: i.update(input_ids=torch.cat([i["input_ids"], torch.full((2, 3), IMAGE_TOKEN)], 1),
                                     attention_mask=None)),
         PackingError, ("sample 0", "21 image placeholder tokens", "2 image(s)", "= 18")),
    Case("placeholders-without-pixels", _forward(lambda i: i.update(pixel_values=None, pixel_attention_mask=None)),
         PackingError, ("placeholders", f"id {IMAGE_TOKEN}", "no pixel_values")),
    Case("pixels-without-placeholders", _forward(_set("input_ids", lambda ids: ids.masked_fill(ids == IMAGE_TOKEN, 5))),
         PackingError, ("sample 0", "0 image placeholder tokens", "2 image(s)")),
    Case("token-ids-outside-vocab", _forward(_set("input_ids", lambda ids: ids + 1000)), VlmkitError,
         ("outside the vocabulary", "[0, 300)", "max 1290")),
    Case("token-ids-negative", _forward(_set("input_ids", lambda ids: ids - 1000)), VlmkitError,
         ("outside the vocabulary", "min -1000")),
    Case("token-ids-not-a-tensor", _forward(_set("input_ids", lambda ids: ids.tolist())), VlmkitError,
         ("input_ids", "list")),
    Case("pixels-wrong-rank", _forward(_set("pixel_values", lambda p: p[0])), PackingError,
         ("pixel_values", "(2, 3, 48, 48)", "(B, N_images, 3, H, W)")),
    Case("pixels-wrong-channels", _forward(_set("pixel_values", lambda p: p.repeat(1, 1, 2, 1, 1)[:, :, :4])),
         ProcessorError, ("pixel_values", "4 channel(s)", "takes 3")),
    Case("pixels-not-patch-multiple", _forward(lambda i: i.update(pixel_values=i["pixel_values"][..., :45, :45],
                                                                   pixel_attention_mask=None)),
         ProcessorError, ("45x45", "patch size 8")),
    Case("pixels-wrong-image-size", _forward(lambda i: i.update(
        pixel_values=torch.nn.functional.pad(i["pixel_values"], (0, 16, 0, 16)), pixel_attention_mask=None)),
         ProcessorError, ("64x64", "48x48", "9 visual tokens")),
    Case("pixels-integer-dtype", _forward(_set("pixel_values", lambda p: (p * 100).to(torch.uint8))), ProcessorError,
         ("pixel_values", "torch.uint8", "floating point")),
    Case("pixels-nan", _forward(_set("pixel_values", lambda p: p.masked_fill(p > 1.5, float("nan")))), ProcessorError,
         ("pixel_values", "NaN")),
    Case("pixel-mask-wrong-shape", _forward(_set("pixel_attention_mask", lambda m: m[:, 0])), ProcessorError,
         ("pixel_attention_mask", "(2, 48, 48)", "(2, 2, 48, 48)")),
    Case("pixel-mask-wrong-batch", _forward(_set("pixel_attention_mask", lambda m: m[:1])), ProcessorError,
         ("pixel_attention_mask", "(1, 2, 48, 48)")),
    Case("attention-mask-wrong-shape", _forward(_set("attention_mask", lambda m: m[:, :3])), ProcessorError,
         ("attention_mask", "(2, 3)")),
    Case("labels-wrong-shape", _forward(lambda i: i.update(labels=i["input_ids"][:, :3])), ProcessorError,
         ("labels", "(2, 3)")),
    Case("forward-on-a-meta-model", lambda ctx: vlmkit.builder.assemble(vlmkit.spec.validate_spec(TINY),
                                                                         frozenset(SLOTS))(torch.tensor([[1, 2]])),
         VlmkitError, ("meta device", "no weights")),
    Case("position-ids-wrong-shape", _forward(lambda i: i.update(position_ids=torch.arange(3)[None])), ProcessorError,
         ("position_ids", "(1, 3)")),
]


@pytest.fixture(scope="module")
def tiny_model():
    cache = {}

    def get():
        if "m" not in cache:
            cache["m"] = vlmkit.build_from_hf(tiny_checkpoint())
        return cache["m"]

    return get


def test_table_is_big_enough():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML python-tag row would `touch PWNED` here if it ever ran
    if case.id == "device-absent-gpu-index" and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 GPUs")
    with pytest.raises(case.error) as info:
        case.run(Ctx(tmp_path, tiny_model))
    err = info.value
    text = str(err)
    for needle in case.needles:
        assert needle in text, f"{case.id}: {needle!r} not in the message:\n{text}"
    if case.key_path is not None:
        assert getattr(err, "key_path", None) == case.key_path, text
    assert err.hint or isinstance(err, (SpecError, PackingError)), f"{case.id}: no hint: {text}"
    assert not (tmp_path / "PWNED").exists()


def test_strict_false_loads_the_rest_and_reports_what_it_skipped(tmp_path, caplog):
    """A missing bias: the model builds, the report lists it, the loaded weight beside it is
    kept bit for bit, nothing is left on the meta device, and a warning is logged."""
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(tmp_path / "ckpt")
    reference = load_file(str(folder / "model.safetensors"))
    damaged = dict(reference)
    del damaged["model.vision_model.encoder.layers.0.mlp.fc1.bias"]
    save_file(damaged, str(folder / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="fc1.bias"):
        vlmkit.build_from_hf(folder)
    with caplog.at_level(logging.WARNING, logger="vlmkit.builder"):
        model = vlmkit.build_from_hf(folder, strict=False)
    report = model.load_report
    assert report.missing == {"vision_tower": ["model.vision_model.encoder.layers.0.mlp.fc1.bias"]}
    assert model.untrained_parameters() == {"vision_tower": ["encoder.layers.0.mlp.fc1.bias"]}
    assert "fc1.bias" in caplog.text and "strict=False" in caplog.text
    fc1 = model.vision_tower.encoder.layers[0].mlp.fc1
    assert torch.equal(fc1.weight, reference["model.vision_model.encoder.layers.0.mlp.fc1.weight"])
    assert not fc1.bias.is_meta and bool(torch.isfinite(fc1.bias).all())
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    ids, mask, pixels, pmask = batch()
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask, pixels, pmask).logits).all()


def test_strict_false_with_a_fused_part_missing(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(tmp_path / "ckpt")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.text_model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    model = vlmkit.build_from_hf(folder, strict=False)
    assert model.load_report.missing == {"backbone": ["model.text_model.layers.1.self_attn.q_proj.weight"]}
    assert model.untrained_parameters() == {"backbone": ["layers.1.self_attn.qkv_proj.weight"]}
    assert not model.backbone.layers[1].self_attn.qkv_proj.weight.is_meta


def test_device_cuda_without_gpu_is_a_vlmkit_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(VlmkitError, match="not available on this machine") as info:
        vlmkit.build(TINY, load_weights=False, device="cuda")
    assert "torch.cuda.is_available() is False" in str(info.value)


def test_meta_tensor_left_by_a_component_is_a_plugin_error(monkeypatch):
    """A component whose buffer stays on the meta device must not run half-initialised."""
    from vlmkit import builder
    from vlmkit.errors import PluginError

    real = builder._materialize

    def leave_a_meta_buffer(model, report, sources):
        real(model, report, sources)
        model.connector.register_buffer("stale", torch.empty(3, device="meta"), persistent=False)

    monkeypatch.setattr(builder, "_materialize", leave_a_meta_buffer)
    with pytest.raises(PluginError, match="meta device"):
        vlmkit.build(TINY, load_weights=False)


def test_memory_guard_names_the_size(monkeypatch):
    from vlmkit import wiring

    monkeypatch.setattr(wiring, "available_memory", lambda: (1024, "available memory (MemAvailable)"))
    with pytest.raises(SpecError, match=r"parameters .* GiB in float32\) but only .* GiB are left \(available memory"):
        vlmkit.build(TINY, load_weights=False)


def test_both_safetensors_and_index_missing_shard_message_is_one_line_per_problem(tmp_path):
    folder = copy_checkpoint(tmp_path / "ckpt")
    shutil.copy(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))  # fmt: skip
    with pytest.raises(WeightLoadError) as info:
        vlmkit.build_from_hf(folder)
    assert "model-00002-of-00002.safetensors" in str(info.value)
    assert "model-00001-of-00002.safetensors" not in str(info.value).split("not in the folder:")[1]
