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


@pytest.mark.parametrize("flags, warned", [([], True), (["avx2", "avx512_vnni"], False), (["amx_int8"], False)])
def test_int8_warns_on_a_cpu_without_int8_dot_instructions(monkeypatch, flags, warned):
    import vlmkit
    from vlmkit import quant_schemes
    from vlmkit.cli_helpers import quantize_and_say

    from .test_generation import TINY

    class Err:
        lines: list[str] = []

        def print(self, line, markup=False):  # noqa: ANN001, ARG002
            self.lines.append(line)

    monkeypatch.setattr(quant_schemes, "cpu_flags", lambda: {"capability": "AVX2", "flags": flags})
    err = Err()
    err.lines = []
    quantize_and_say(err, vlmkit.build(TINY, load_weights=False))
    assert err.lines[0].startswith("int8: ") and "linear layers quantized" in err.lines[0]
    assert any("no VNNI/AMX" in line and "--quantize auto" in line for line in err.lines) == warned
