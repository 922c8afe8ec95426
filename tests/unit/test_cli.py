"""The ``vlmkit`` command line: fast help, inspect/plugins/schema output, readable errors.

Exit codes: 0 ok; 1 a VlmkitError (one ``error:`` line, a ``hint:`` line, no traceback unless
``--debug``); 2 a usage error or an internal error (a bug: ``internal error: ...``, please report).
Most checks call :func:`vlmkit.cli.main` in-process (torch is already imported here); the exit
code, help speed and import checks run the real console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vlmkit.cli import main

from ..conftest import REPO

SMOLVLM_YAML = str(REPO / "configs" / "smolvlm-256m.yaml")


def _script() -> list[str]:
    exe = Path(sys.executable).with_name("vlmkit")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "vlmkit.cli"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([*_script(), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def wide(monkeypatch):
    """Rich tables as wide as they want (no cell truncation) for the in-process runs."""
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def bad_yaml(tmp_path) -> Path:
    data = yaml.safe_load(Path(SMOLVLM_YAML).read_text())
    data["connector"]["scale_factor"] = "four"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------- help and imports
def test_help_is_fast_and_lists_the_commands():
    runs = []
    for _ in range(2):  # the first run may pay for a cold disk cache
        start = time.perf_counter()
        proc = _run("--help")
        runs.append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr
    for command in ("inspect", "plugins", "schema", "--debug"):
        assert command in proc.stdout
    assert min(runs) < 1.5, f"`vlmkit --help` took {min(runs):.2f} s (goal: < 0.5 s)"


def test_help_and_cli_import_do_not_import_torch():
    code = (
        "import sys\n"
        "from vlmkit.cli import main\n"
        "heavy = lambda: sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)\n"
        "before = heavy()\n"
        "rc = main(['--help'])\n"
        "print('RESULT', rc, before, heavy())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    assert line == "RESULT 0 [] []", proc.stdout + proc.stderr


def test_importtime_of_help_has_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "vlmkit.cli", "--help"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "vlmkit.cli" in modules or "typer" in modules
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}


# ---------------------------------------------------------------------------- inspect / plugins / schema
def test_inspect_shipped_yaml_without_weights(capsys, wide):
    assert main(["inspect", SMOLVLM_YAML]) == 0
    out = capsys.readouterr().out
    for slot, name in [("vision_tower", "navit"), ("connector", "idefics3"), ("aligner", "hidden_align"),
                       ("packer", "image_packer"), ("backbone", "llama")]:  # fmt: skip
        assert slot in out and name in out
    assert "86,433,024" in out and "162,974,016" in out  # per-slot parameter counts
    assert "hidden_size=768" in out and "scale_factor=4" in out and "num_key_value_heads=3" in out  # per-slot params
    assert "512x512 -> 1024 patches x 768 -> 64 tokens x 12288 -> 64 tokens x 576" in out
    assert "visual tokens per image: 64" in out
    assert "not available here" in out and "weights: none loaded" in out


def test_inspect_offline_repo_id_uses_the_bundled_configs(capsys, wide):
    assert main(["inspect", "HuggingFaceTB/SmolVLM-256M-Instruct"]) == 0
    out = capsys.readouterr().out
    assert "bundled with vlmkit" in out and "Hub not reachable" in out
    assert "visual tokens per image: 64" in out


def test_plugins_lists_the_builtins(capsys, wide):
    assert main(["plugins"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "│" in line]
    cells = [[c.strip() for c in row.strip("│ ").split("│")] for row in rows]
    found = {(c[0], c[1]): c[3] for c in cells if len(c) == 4}
    for key in [("vision_tower", "navit"), ("vision_tower", "siglip"), ("backbone", "llama")]:
        assert found.get(key) == "vlmkit", (key, found)


def test_schema_prints_json(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["type"] == "object" and "vision_tower" in schema["properties"]


def test_schema_to_a_file(tmp_path, capsys):
    out = tmp_path / "schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["additionalProperties"] is False


# ---------------------------------------------------------------------------- errors
def test_bad_yaml_is_one_error_line_and_a_hint(bad_yaml):
    proc = _run("inspect", str(bad_yaml))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "bad.yaml" in errors[0] and "connector.scale_factor" in errors[0] and "'four'" in errors[0]
    assert sum(ln.startswith("hint:") for ln in lines) == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_debug_shows_the_traceback(bad_yaml):
    proc = _run("--debug", "inspect", str(bad_yaml))
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "SpecError" in proc.stderr
    assert any(ln.startswith("error:") for ln in proc.stderr.splitlines())


def test_debug_after_the_command_works_too(bad_yaml, capsys):
    assert main(["inspect", str(bad_yaml), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["inspect", "no/such/model.yaml"], "no YAML file"),
        (["inspect", "someone/not-cached-model"], "cannot be reached"),
        (["inspect", "./no-such-folder"], "no folder"),
        (["inspect", SMOLVLM_YAML, "--weights"], "HuggingFaceTB/SmolVLM-256M-Instruct"),
    ],
)
def test_vlmkit_errors_exit_1_without_traceback(args, needle, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and "hint:" in err
    assert "Traceback" not in err


def test_error_text_is_not_rich_markup(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "[bold]x[/bold].yaml")]) == 1
    assert "[bold]x[/bold].yaml" in capsys.readouterr().err


def test_unexpected_exception_is_an_internal_error(monkeypatch, capsys):
    import vlmkit.inspect

    def broken(*_a, **_k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(vlmkit.inspect, "describe", broken)
    assert main(["inspect", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("internal error: ZeroDivisionError: division by zero")
    assert "please report" in err and "Traceback" not in err
    assert main(["--debug", "inspect", "x.yaml"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["inspect"], ["no-such-command"], ["inspect", "x", "--no-such-option"]])
def test_usage_errors_exit_2(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Usage:" in err and "Traceback" not in err


def test_no_arguments_prints_help(capsys):
    main([])
    captured = capsys.readouterr()
    assert "inspect" in captured.out + captured.err


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_inspect_shapes_declared_match_the_meta_trace(path):
    """``vlmkit inspect`` prints the shapes the parts declare; running them on meta agrees."""
    from vlmkit.inspect import image_shapes
    from vlmkit.spec import load_yaml

    spec = load_yaml(path)
    declared = image_shapes(spec)
    assert [name for name, _ in declared][:2] == ["pixels", "vision_tower"]
    assert declared == image_shapes(spec, trace=True)


# ---------------------------------------------------------------------------- version, generate on a YAML model


def test_version(capsys):
    import vlmkit

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vlmkit {vlmkit.__version__}"


def test_generate_on_a_yaml_model_uses_the_towers_tile_size(tmp_path, capsys):
    """A siglip tower of 32 px tiles in front of a backbone saved in the SmolVLM layout, with
    SmolVLM's tokenizer: the processor must make 32 px tiles (the model's spec), not 512 px ones."""
    import torch
    from PIL import Image

    import vlmkit

    from ..conftest import published_folder

    tokenizer = published_folder("SmolVLM-256M-Instruct")
    text = {"name": "llama", "vocab_size": 49280, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 2}  # fmt: skip
    torch.manual_seed(0)
    lm = vlmkit.build({
        "vision_tower": {"name": "navit", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        "connector": {"name": "idefics3", "scale_factor": 2},
        "packer": {"name": "image_packer", "image_token_id": 49190}, "backbone": text,
    }, load_weights=False)  # fmt: skip
    lm.save_pretrained(tmp_path / "lm")
    model_yaml = tmp_path / "swapped.yaml"
    model_yaml.write_text(yaml.safe_dump({
        "vision_tower": {"name": "siglip", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        "connector": {"name": "idefics3", "scale_factor": 2},
        "packer": {"name": "image_packer", "image_token_id": 49190}, "backbone": text,
        "weights": {"backbone": str(tmp_path / "lm")}, "tokenizer": str(tokenizer),
    }))  # fmt: skip
    Image.new("RGB", (80, 40), (200, 30, 30)).save(tmp_path / "red.png")
    code = main(["generate", str(model_yaml), "-p", "What colour?", "-i", str(tmp_path / "red.png"), "-n", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # 32 px tiles, the checkpoint's 4x4 grid at most: 80x40 -> 128x64 = 2x4 tiles + global, 4 tokens each
    assert "2x4 tiles + global = 9 tiles, 36 visual tokens" in captured.err
