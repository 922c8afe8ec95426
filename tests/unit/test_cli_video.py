"""``vlmkit generate SOURCE --video clip.mp4``: the token-cost preflight, the context refusal with
the --max-frames / --fps that fit, and flags checked before the model loads."""

from __future__ import annotations

import warnings

import pytest

from vlmkit.cli import main

from ..parity.tiny_video import CONTEXT, tiny_smolvlm2, write_video

pytest.importorskip("av")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video") / "tiny-smolvlm2"
    tiny_smolvlm2(folder)
    return folder


def test_generate_on_a_video_reports_the_cost_first(tiny, tmp_path, capsys):
    clip = write_video(tmp_path / "clip.mp4", 40, 10)  # 4 s at 1 fps: 4 frames of 4 tokens
    code = main(["generate", str(tiny), "--video", str(clip), "-p", "What happens?", "-n", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"video 1 '{clip}' (64x48, 40 frames at 10 fps, 4.0 s): 4 frames x 4 tokens = 16 visual tokens" in captured.err
    assert "prompt: " in captured.err and "(16 visual)" in captured.err
    assert captured.out.strip()
    code = main(["generate", str(tiny), "--video", str(clip), "-p", "Why?", "-n", "2", "--fps", "2", "--max-frames", "6"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "6 frames x 4 tokens = 24 visual tokens" in captured.err


def test_a_video_over_the_context_is_refused_with_what_fits(tiny, tmp_path, capsys):
    import vlmkit

    clip = write_video(tmp_path / "long.mp4", 100, 1)  # 100 s: 64 frames at the checkpoint's 1 fps
    new = CONTEXT - 400
    code = main(["generate", str(tiny), "--video", str(clip), "-p", "What happens?", "-n", str(new)])
    captured = capsys.readouterr()
    assert code == 1
    assert "64 frames x 4 tokens per frame" in captured.err and f"over the model's context of {CONTEXT} tokens" in captured.err
    hint = captured.err.split("hint:")[1]
    frames = int(hint.split("--max-frames ")[1].split()[0])
    rate = float(hint.split("--fps ")[1].split(")")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = vlmkit.load_processor(tiny)
    prompt = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "video", "path": str(clip)}, {"type": "text", "text": "What happens?"}]}])  # fmt: skip
    budget = CONTEXT - new
    assert proc.prompt_cost(prompt, videos=[clip], max_frames=frames).total_tokens <= budget
    assert proc.prompt_cost(prompt, videos=[clip], max_frames=frames + 1).total_tokens > budget  # the largest that fits
    assert proc.prompt_cost(prompt, videos=[clip], fps=rate).total_tokens <= budget


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fps", "2"], "--fps and --max-frames only apply with --video"),
        (["--video", "missing.mp4"], "no video file 'missing.mp4'"),
        (["--video", "x.mp4", "--max-frames", "0"], "--max-frames must be an integer >= 1, got 0"),
        (["--video", "x.mp4", "--fps", "-1"], "--fps must be a number of frames per second > 0, got -1.0"),
    ],
)
def test_bad_video_flags_fail_before_loading(args, message, capsys):
    code = main(["generate", "no-such-model-folder", "-p", "Hi", *args])
    assert code == 1
    assert message in capsys.readouterr().err


def test_video_with_batch_is_refused(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "x.mp4").write_bytes(b"")
    code = main(["generate", "no-such-model-folder", "--batch", str(tmp_path / "p.jsonl"), "--video", str(tmp_path / "x.mp4")])
    assert code == 1
    assert "--video does not apply with --batch" in capsys.readouterr().err
