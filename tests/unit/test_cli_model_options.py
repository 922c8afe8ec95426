"""The model options of ``generate``, ``chat`` and ``serve`` (``--int8``, ``--quantize``,
``--vision-dtype``): checked before the model loads, applied once it has, each saying what it did."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.errors import VlmkitError

COMMANDS = [
    ["generate", "/nonexistent/model", "-p", "hi"],
    ["chat", "/nonexistent/model"],
    pytest.param(["serve", "/nonexistent/model"], marks=pytest.mark.skipif(
        importlib.util.find_spec("fastapi") is None, reason="vlmkit serve needs the serve extra")),
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--vision-dtype", "int4"], ["unknown dtype 'int4'", "bfloat16", "float32", "'int8' (w8a8 vision layers)"]),
        (["--vision-dtype", "bf16", "--quantize", "w8a8"], ["w8a8 runs the vision tower in int8", "--quantize w8 or w4"]),
        (["--int8", "--quantize", "w4"], ["--int8 and --quantize"]),
        (["--quantize", "int3"], ["'int3' is not a scheme", "auto, fp32, w8, w4, w8a8"]),
    ],
)
def test_bad_model_options_fail_before_loading(capsys, command, flags, needles):
    assert main([*command, *flags]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    assert all(n in err for n in needles), err
    assert "nonexistent" not in err  # nothing was loaded


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("vision", ["bfloat16", "int8"])
def test_generate_w4_with_another_vision_dtype_matches_the_same_model_in_process(picture, capsys, vision):
    pytest.importorskip("transformers")
    from vlmkit.chat import ChatSession
    from vlmkit.quant_schemes import quantize
    from vlmkit.vision_dtype import set_vision_dtype

    from ..e2e._tiny_smolvlm import load_tiny, tiny_smolvlm_folder

    model, processor = load_tiny()
    quantize(model, "w4")
    set_vision_dtype(model, vision)
    want = ChatSession(model, processor, max_new_tokens=6).ask("What is it?", [Image.open(picture).convert("RGB")])
    code = main(["generate", str(tiny_smolvlm_folder()), "-p", "What is it?", "-i", str(picture), "-n", "6",
                 "--quantize", "w4", "--vision-dtype", vision])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.strip() == want.strip()
    assert "quantize: w4;" in out.err and f"vision dtype: {vision} (vision_tower" in out.err


def test_a_w8a8_choice_refuses_a_bfloat16_vision_side_with_the_cli_hint(monkeypatch):
    """``--int8`` (or ``auto``) choosing w8a8 on this CPU makes the vision tower int8: the vision
    dtype cannot apply, and the error says which option works instead."""
    import vlmkit
    from vlmkit import cli_model
    from vlmkit.quantize import quantize_int8

    from .test_generation import TINY

    model = vlmkit.build(TINY, load_weights=False)
    monkeypatch.setattr(cli_model, "load_model_and_processor", lambda source: (model, None))
    monkeypatch.setattr(cli_model, "quantize_scheme", lambda err, m, scheme, source: quantize_int8(m))  # as if w8a8 was chosen
    options = cli_model.check_model_options(None, True, "bfloat16")
    assert options == cli_model.ModelOptions("int8", "bfloat16")
    with pytest.raises(VlmkitError, match="chose w8a8 on this CPU") as err:
        cli_model.load_for_command(_Err(), "tiny", options)
    assert "--quantize w8 or w4" in str(err.value)
    model = vlmkit.build(TINY, load_weights=False)  # --vision-dtype int8 is what w8a8 made: said, not refused
    err = _Err()
    cli_model.load_for_command(err, "tiny", cli_model.check_model_options(None, True, "int8"))
    assert err.lines == ["vision dtype: int8 (vision_tower; the text model as it was); the vision tower is int8 (w8a8) already"]


def test_option_values_are_resolved_once():
    from vlmkit.cli_model import ModelOptions, check_model_options

    assert check_model_options("w8a8", False, "int8") == ModelOptions("w8a8", "int8")  # the tower is int8 either way
    assert check_model_options("w4", False, "bf16") == ModelOptions("w4", "bfloat16")
    assert check_model_options(None, True, "w8a8") == ModelOptions("int8", "int8")
    assert check_model_options(None, False, None) == ModelOptions(None, None)
    with pytest.raises(VlmkitError, match="w8a8 runs the vision tower in int8"):
        check_model_options("w8a8", False, "float32")


class _Err:
    is_terminal = False

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, line, markup=False):  # noqa: ANN001, ARG002
        self.lines.append(line)
