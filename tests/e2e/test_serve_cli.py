"""``vlmkit serve SOURCE --quantize w4 --vision-dtype bfloat16`` as a user starts it: the command
in its own process on 127.0.0.1, the real ``openai`` client, the answer equal to the same
quantized model run in this process."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from ._serve_kit import as_processor_message, data_url, decoded, image_part, png, reference, user  # noqa: E402
from ._tiny_smolvlm import load_tiny, tiny_smolvlm_folder  # noqa: E402

STARTUP_S = 120


def _start(args: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    """The ``vlmkit serve`` process, its URL (from uvicorn's 'running on' line) and its stderr lines so far."""
    proc = subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "serve", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=os.environ.copy())  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr] + [lines.put(None)], daemon=True).start()
    seen, deadline = [], time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1), seen
    proc.kill()
    pytest.fail("vlmkit serve did not start:\n" + "".join(seen)[-3000:])


def test_serve_command_quantized_with_a_bfloat16_vision_side():
    from vlmkit.quant_schemes import quantize
    from vlmkit.vision_dtype import set_vision_dtype

    folder = tiny_smolvlm_folder()
    proc, url, lines = _start([str(folder), "--port", "0", "--quantize", "w4", "--vision-dtype", "bfloat16", "--model-name", "tiny"])
    try:
        log = "".join(lines)
        assert "quantize: w4;" in log and "vision dtype: bfloat16" in log
        model, processor = load_tiny()
        quantize(model, "w4")
        set_vision_dtype(model, "bfloat16")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        image = png((96, 64), noise=True)
        for parts in ((), (image_part(data_url(image)),)):
            got = client.chat.completions.create(model="tiny", messages=[user("What is it?", *parts)], temperature=0, max_tokens=6)
            images = [decoded(image).convert("RGB")] if parts else []
            want, reason, _ = reference(model, processor, [as_processor_message("What is it?", len(images))], images, 6)
            assert want and got.choices[0].message.content == want and got.choices[0].finish_reason == reason
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
