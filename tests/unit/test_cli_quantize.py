"""``vlmkit generate --quantize SCHEME``: checked before loading, runs, says what it chose."""

from __future__ import annotations

import pytest
import yaml

from vlmkit.cli import main


def test_bad_scheme_fails_before_loading(capsys):
    assert main(["generate", "/nonexistent/model", "-p", "hi", "--quantize", "int3"]) != 0
    err = capsys.readouterr().err
    assert "int3" in err and "auto, fp32, w8, w4, w8a8" in err and "nonexistent" not in err


def test_int8_and_quantize_together_fail(capsys):
    assert main(["generate", "/nonexistent/model", "-p", "hi", "--int8", "--quantize", "w8"]) != 0
    assert "--int8 and --quantize" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["w8", "auto"])
def test_generate_with_quantize_runs(tmp_path, capsys, scheme):
    import torch

    import vlmkit

    from ..conftest import published_folder

    text = {"name": "llama", "vocab_size": 49280, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 2}  # fmt: skip
    spec = {"vision_tower": {"name": "navit", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
            "connector": {"name": "idefics3", "scale_factor": 2},
            "packer": {"name": "image_packer", "image_token_id": 49190}, "backbone": text}  # fmt: skip
    torch.manual_seed(0)
    vlmkit.build(spec, load_weights=False).save_pretrained(tmp_path / "lm")
    model_yaml = tmp_path / "m.yaml"
    model_yaml.write_text(yaml.safe_dump({**spec, "weights": {"backbone": str(tmp_path / "lm")},
                                          "tokenizer": str(published_folder("SmolVLM-256M-Instruct"))}))  # fmt: skip
    code = main(["generate", str(model_yaml), "-p", "Hello?", "-n", "3", "--quantize", scheme])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "quantize: " in captured.err and "cache off (SOURCE is not a local folder)" in captured.err
    if scheme == "w8":
        assert "quantize: w8;" in captured.err


class _Err:
    """A console stand-in that keeps the lines printed."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, line, markup=False):  # noqa: ANN001, ARG002
        self.lines.append(line)


def test_check_quantize_maps_int8_to_the_int8_scheme():
    from vlmkit.cli_helpers import check_quantize

    assert check_quantize(None, True) == "int8" and check_quantize(None, False) is None and check_quantize("w8a8", False) == "w8a8"


@pytest.mark.parametrize("kernels", ["vlmkit", "torch"])
@pytest.mark.parametrize("flags", [["avx2", "fma"], ["avx2", "avx512_vnni"], ["amx_int8"]])
def test_int8_says_which_scheme_and_why(monkeypatch, flags, kernels):
    """--int8 where the backbone decodes w8 in one native call is w8 (nothing timed); else on a CPU
    without int8 dot products w8 (no timing decides it, no warning); with them w8a8 or w8 as this
    CPU's timing says; the line says why."""
    import contextlib

    import vlmkit
    from vlmkit import native, scheme_choice
    from vlmkit.cli_helpers import quantize_and_say

    from .test_generation import TINY

    if kernels == "vlmkit" and not native.available():
        pytest.skip(f"vlmkit's native kernels: {native.status()}")
    monkeypatch.setattr(scheme_choice, "cpu_flags", lambda: {"capability": "AVX2", "flags": flags})
    err = _Err()
    model = vlmkit.build(TINY, load_weights=False)
    with contextlib.nullcontext() if kernels == "vlmkit" else native.disabled():
        quantize_and_say(err, model, "/not/a/folder")
    assert len(err.lines) == 1, err.lines
    line = err.lines[0]
    if kernels == "vlmkit":
        assert line.startswith("int8: w8 (the backbone decodes w8") and "one native call per token" in line
        assert "timed nothing" in line and model.quantized == "w8"
        return
    assert line.startswith(("int8: w8a8 (", "int8: w8 (")) and " layers in " in line and "timed one row" in line
    if flags == ["avx2", "fma"]:
        assert line.startswith("int8: w8 (this CPU has no VNNI/AMX") and model.quantized == "w8"
    elif line.startswith("int8: w8a8"):
        assert "prompts are not slower than float32" in line and model.quantized == "int8"


@pytest.mark.parametrize("flags, warned", [([], True), (["avx2", "avx512_vnni"], False), (["amx_int8"], False)])
def test_explicit_w8a8_warns_on_a_cpu_without_int8_dot_instructions(monkeypatch, flags, warned):
    import vlmkit
    from vlmkit import scheme_choice
    from vlmkit.cli_helpers import quantize_scheme

    from .test_generation import TINY

    monkeypatch.setattr(scheme_choice, "cpu_flags", lambda: {"capability": "AVX2", "flags": flags})
    err = _Err()
    quantize_scheme(err, vlmkit.build(TINY, load_weights=False), "w8a8", "/not/a/folder")
    assert err.lines[0].startswith("quantize: w8a8; ") and " layers in " in err.lines[0]
    assert any("no VNNI/AMX" in line and "--int8 picks" in line for line in err.lines) == warned


def test_generate_int8_on_a_folder_loads_the_cache_the_second_time(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from vlmkit import scheme_choice

    from ..e2e._tiny_smolvlm import tiny_smolvlm_folder

    monkeypatch.setattr(scheme_choice, "cpu_flags", lambda: {"capability": "AVX2", "flags": ["avx2"]})  # --int8: w8
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path / "cache"))
    folder = tiny_smolvlm_folder()
    for want in ("written", "hit"):
        for flag in (["--int8"], ["--quantize", "w8a8"]):
            code = main(["generate", str(folder), "-p", "Hello?", "-n", "2", *flag])
            err = capsys.readouterr().err
            assert code == 0, err
            assert f"cache {want}" in err and ("int8: w8 (" if flag == ["--int8"] else "quantize: w8a8;") in err, err
