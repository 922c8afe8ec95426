"""``vlmkit chat`` (the REPL over ChatSession) and ``vlmkit generate --batch`` on a tiny random
SmolVLM-256M-layout model with the published tokenizer and chat template."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmkit.chat import ChatSession
from vlmkit.cli import main
from vlmkit.repl import run_repl

from ..e2e._tiny_smolvlm import load_tiny, tiny_smolvlm_folder


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture
def picture(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "pic.png"
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
    return path


def _repl(session, lines, *, interrupt_on=None):
    """Run the REPL on ``lines``; ``(answers written, notes)``. ``interrupt_on``: the line whose
    answer gets a Ctrl-C at its first chunk."""
    pending = iter(lines)
    out, notes, current = [], [], {"line": None}

    def read(_prompt):
        try:
            current["line"] = next(pending)
        except StopIteration:
            raise EOFError from None
        out.append("")
        return current["line"]

    def write(chunk):
        if chunk != "\n" and current["line"] == interrupt_on:
            current["line"] = None
            raise KeyboardInterrupt
        out[-1] += chunk

    from vlmkit.cli_helpers import image_line  # noqa: PLC0415 - the CLI's own description of an image

    run_repl(session, read=read, write=write, note=notes.append, open_images=lambda ps: [Image.open(p).convert("RGB") for p in ps],
             describe_image=lambda p, img: image_line(session.processor, p, img, {}))  # fmt: skip
    return [o.strip() for o in out], notes


def test_repl_turns_commands_and_reset(tiny, picture):
    model, processor = tiny
    ref = ChatSession(model, processor, max_new_tokens=8)
    first = ref.ask("What is it?", [Image.open(picture).convert("RGB")])
    second = ref.ask("More?")
    session = ChatSession(model, processor, max_new_tokens=8)
    lines = [f"/image {picture}", "What is it?", "More?", "/help", "/bogus", "/reset", f"/image {picture}", "What is it?", "/quit", "never read"]
    out, notes = _repl(session, lines)
    assert out[1] == first.strip() and out[2] == second.strip() and out[7] == first.strip()
    assert any("2x3 tiles" in n or "tiles" in n for n in notes if str(picture) in n)  # the image's cost
    assert any("reused" in n for n in notes) and "conversation reset" in notes
    assert any("unknown command '/bogus'" in n for n in notes) and any("/image PATH" in n for n in notes)
    assert len(out) == 9  # /quit ended the loop


def test_repl_ctrl_c_stops_the_answer_not_the_chat(tiny, picture):
    model, processor = tiny
    session = ChatSession(model, processor, max_new_tokens=8)
    out, notes = _repl(session, ["Hello there", "Again"], interrupt_on="Hello there")
    assert "[answer stopped]" in notes and out[1]  # the next line was answered
    assert session.messages[1]["role"] == "assistant" and len(session.messages) == 4


def test_repl_reports_a_bad_image_and_goes_on(tiny, tmp_path):
    model, processor = tiny
    session = ChatSession(model, processor, max_new_tokens=4)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")

    def open_images(paths):
        from vlmkit.cli_helpers import read_images  # noqa: PLC0415

        return read_images(paths)

    notes = []
    lines = iter([f"/image {bad}", "/image", "Hi"])

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    run_repl(session, read=read, write=lambda c: None, note=notes.append, open_images=open_images, describe_image=lambda p, i: "")
    assert any("cannot read image" in n for n in notes) and "usage: /image PATH" in notes
    assert session.images == [] and len(session.messages) == 2


def test_chat_command_in_a_subprocess(tiny):
    model, processor = tiny
    want = ChatSession(model, processor, max_new_tokens=6).ask("Hello")
    run = subprocess.run([sys.executable, "-m", "vlmkit.cli", "chat", str(tiny_smolvlm_folder()), "-n", "6"],
                         input="Hello\n/quit\n", capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == want.strip()
    assert "reused" in run.stderr


def test_chat_command_quantized_answers_as_the_quantized_model():
    from vlmkit.quant_schemes import quantize

    model, processor = load_tiny()  # a model of its own: quantizing changes it in place
    quantize(model, "w8")
    want = ChatSession(model, processor, max_new_tokens=6).ask("Hello")
    run = subprocess.run([sys.executable, "-m", "vlmkit.cli", "chat", str(tiny_smolvlm_folder()), "-n", "6", "--quantize", "w8"],
                         input="Hello\n/quit\n", capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert want and run.stdout.strip() == want.strip()
    assert "quantize: w8;" in run.stderr


def test_generate_batch_writes_one_answer_per_prompt(tiny, picture, tmp_path, capsys):
    model, processor = tiny
    rows = [{"prompt": "Describe.", "images": [picture.name], "id": "a"}, {"prompt": "Hi"}, {"prompt": "Say a word.", "id": 7}]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "answers.jsonl"
    code = main(["generate", str(tiny_smolvlm_folder()), "--batch", str(src), "--batch-size", "2", "-n", "5", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", 2, 7]
    for row, g in zip(rows, got):  # each batched answer is the one-prompt answer
        images = [Image.open(picture).convert("RGB")] if "images" in row else []
        assert g["answer"] == ChatSession(model, processor, max_new_tokens=5).ask(row["prompt"], images)
        assert g["finish_reason"] in ("stop", "length") and 1 <= g["new_tokens"] <= 5


@pytest.mark.parametrize(
    ("lines", "args", "needle"),
    [
        (['{"prompt": "x", "image": []}'], [], "prompts.jsonl:1: unknown key(s) ['image']"),
        (['{"prompt": "x"}', "{oops"], [], "prompts.jsonl:2: not a JSON object"),
        (['{"prompt": "x", "images": ["missing.png"]}'], [], "missing.png' is not a file"),
        (['{"prompt": ""}'], [], "'prompt' must be a non-empty string"),
        ([], [], "holds no prompts"),
        (['{"prompt": "x"}'], ["-p", "also"], "not both"),
        (['{"prompt": "x"}'], ["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_batch_files_fail_before_the_model_loads(tmp_path, capsys, lines, args, needle):
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(lines))
    code = main(["generate", str(tmp_path / "no-such-model"), "--batch", str(src), *args])
    assert code == 1
    assert needle in capsys.readouterr().err.replace("\n", " ")


def test_batch_only_options_need_batch(capsys):
    assert main(["generate", "x", "-p", "hi", "-o", "out.jsonl"]) == 1
    assert "--output only applies with --batch" in capsys.readouterr().err
    assert main(["generate", "x"]) == 1
    assert "either --prompt TEXT or --batch FILE.jsonl" in capsys.readouterr().err
