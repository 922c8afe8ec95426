"""``vlmkit serve`` end to end: the real ``openai`` client against a uvicorn server on 127.0.0.1.

The model is a tiny random SmolVLM-256M-layout checkpoint with the published tokenizer and chat
template (:mod:`tests.e2e._tiny_smolvlm`). Answers are compared with ``model.generate`` run alone
on the processor's inputs (greedy, so every token must be the same).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from vlmkit.serve import ServerThread, check_options  # noqa: E402

from ._serve_kit import as_processor_message, data_url, decoded, image_part, png, reference, user  # noqa: E402
from ._tiny_smolvlm import CONTEXT, load_tiny  # noqa: E402

KEY = "sk-test-0123"
MAX_IMAGE_BYTES = 200_000
MAX_IMAGE_PIXELS = 1_000_000


# ============================================================================== fixtures
@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-root")
    (root / "inside.png").write_bytes(png((80, 80)))
    return root


@pytest.fixture(scope="module")
def server(tiny, image_root):
    model, proc = tiny
    options = check_options(port=0, api_key=KEY, max_batch=4, max_queue=6, image_root=image_root, max_images=3,
                            max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_IMAGE_PIXELS, request_timeout=120)  # fmt: skip
    with ServerThread(model, proc, options, model_name="tiny") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client, messages, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def stream_text(client, messages, **kwargs) -> tuple[str, str, list]:
    chunks = list(chat(client, messages, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[-1], chunks


# ============================================================================== answers
def test_plain_chat_matches_generate(tiny, client):
    model, proc = tiny
    reply = chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], max_tokens=12)
    want, reason, prompt = reference(model, proc, [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hello there"}], [], 12)  # fmt: skip
    assert reply.choices[0].message.content == want and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == reason
    assert reply.usage.prompt_tokens == prompt and reply.usage.total_tokens == prompt + reply.usage.completion_tokens
    assert reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_matches_and_ends_with_done(tiny, client, server):
    messages = [{"role": "user", "content": "Tell me a story"}]
    text, finish, chunks = stream_text(client, messages, max_tokens=20, stream_options={"include_usage": True})
    plain = chat(client, messages, max_tokens=20)
    assert text == plain.choices[0].message.content and finish == plain.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    body = {"model": "tiny", "messages": messages, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_image_data_url_matches_generate(tiny, client):
    model, proc = tiny
    data = png((120, 70))
    reply = chat(client, [user("What is in the image?", image_part(data_url(data)))], max_tokens=10)
    want, reason, prompt = reference(model, proc, [as_processor_message("What is in the image?", 1)], [decoded(data)], 10)
    assert reply.choices[0].message.content == want and reply.choices[0].finish_reason == reason
    assert reply.usage.prompt_tokens == prompt > 40  # 3x4 tiles + global of 4 tokens each, plus the text
    low = chat(client, [user("What is in the image?", image_part(data_url(data), "low"))], max_tokens=2)
    assert low.usage.prompt_tokens == reference(model, proc, [as_processor_message("What is in the image?", 1)],
                                                [decoded(data)], 1, do_image_splitting=False)[2]  # fmt: skip


def test_several_images_png_jpeg_webp(tiny, client, image_root):
    model, proc = tiny
    files = [png((64, 64)), png((70, 90), fmt="JPEG"), png((50, 40), fmt="WEBP")]
    urls = [data_url(files[0]), data_url(files[1], "image/jpeg"), (image_root / "inside.png").as_uri()]
    reply = chat(client, [user("Compare them.", *(image_part(u) for u in urls))], max_tokens=8)
    images = [decoded(files[0]), decoded(files[1]), decoded((image_root / "inside.png").read_bytes())]
    want, _, prompt = reference(model, proc, [as_processor_message("Compare them.", 3)], images, 8)
    assert reply.choices[0].message.content == want and reply.usage.prompt_tokens == prompt
    webp = chat(client, [user("And this?", image_part(data_url(files[2], "image/webp")))], max_tokens=4)
    assert webp.choices[0].message.content == reference(model, proc, [as_processor_message("And this?", 1)], [decoded(files[2])], 4)[0]


def test_stop_strings_end_the_answer_before_them(tiny, client):
    messages = [{"role": "user", "content": "Count for me"}]
    full = chat(client, messages, max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    reply = chat(client, messages, max_tokens=12, stop=[stop, "never-there"])
    assert reply.choices[0].message.content == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"
    text, finish, _ = stream_text(client, messages, max_tokens=12, stop=stop)
    assert (text, finish) == (full[: full.index(stop)], "stop")


def test_seeded_sampling_is_the_same_alone_and_batched(client):
    messages = [{"role": "user", "content": "Say something"}]
    alone = chat(client, messages, max_tokens=10, temperature=1.3, top_p=0.9, seed=1234).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(chat, client, messages, max_tokens=10, temperature=1.3, top_p=0.9, seed=s) for s in (1234, 1, 2, 1234)]
        texts = [f.result().choices[0].message.content for f in futures]
    assert texts[0] == texts[3] == alone
    assert len(set(texts)) > 1  # other seeds draw other tokens


# ============================================================================== concurrency
PROMPTS = ["Hi", "What is the capital of France?", "Write a long poem about the sea and the sky", "Why?",
           "List three colours", "Explain gravity to a child in simple words", "ok", "Name a number"]  # fmt: skip


def _request(client, k: int, stream: bool) -> tuple[str, str]:
    n = 6 + 5 * (k % 4)
    messages = [user(PROMPTS[k], *([image_part(data_url(png((40 + 30 * k, 60))))] if k % 3 == 0 else []))]
    if stream:
        text, finish, _ = stream_text(client, messages, max_tokens=n)
        return text, finish
    reply = chat(client, messages, max_tokens=n)
    return reply.choices[0].message.content, reply.choices[0].finish_reason


def _batch_rows(server) -> dict[str, float]:
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    return {line.split('le="')[1].split('"')[0]: float(line.split()[-1]) for line in lines if line.startswith("vlmkit_batch_rows_bucket")}


def test_concurrent_streams_equal_sequential_ones(tiny, client, server):
    sequential = [_request(client, k, stream=False) for k in range(len(PROMPTS))]
    before = _batch_rows(server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(lambda k: _request(client, k, stream=True), range(len(PROMPTS))))
    assert concurrent == sequential
    after = _batch_rows(server)
    multi = (after["+Inf"] - after["1.0"]) - (before["+Inf"] - before["1.0"])
    assert multi > 0, "no decode step ran more than one row: the requests were not batched"
    model, proc = tiny
    for k in (1, 3):  # and equal to model.generate alone (k=3 has an image)
        images = [decoded(png((40 + 30 * k, 60)))] if k % 3 == 0 else []
        want = reference(model, proc, [as_processor_message(PROMPTS[k], len(images))], images, 6 + 5 * (k % 4))
        assert sequential[k] == want[:2]


def test_load_200_requests_16_threads(client, server):
    """Every request is a complete answer or a clear 429; nothing is lost; the server is healthy after.
    A refused client pauses briefly (not the whole Retry-After, to keep the test short) and goes on
    with its next request; a refused request is not retried."""

    def one(k: int):
        try:
            return _request(client, k % len(PROMPTS), stream=k % 2 == 0)
        except openai.RateLimitError as exc:
            assert exc.status_code == 429 and int(exc.response.headers["retry-after"]) >= 1
            assert "--max-queue" in exc.message
            time.sleep(0.05)
            return "429"

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    elapsed = time.perf_counter() - start
    answered = [r for r in results if r != "429"]
    assert len(results) == 200 and elapsed < 60
    assert all(isinstance(text, str) and finish in ("stop", "length") for text, finish in answered)
    assert len(answered) >= 10, f"only {len(answered)} of 200 answered"  # at least the slots + queue
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["queued"] == 0
    print(f"\nload: {len(answered)} answered, {200 - len(answered)} x 429, {elapsed:.1f} s")


def _running_drops_to_zero(server, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while httpx.get(f"{server.url}/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return httpx.get(f"{server.url}/health").json()["running"] == 0


def test_disconnect_cancels_and_frees_the_slot(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever"}], "max_tokens": CONTEXT - 64, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
    assert _running_drops_to_zero(server)  # ~4000 tokens would take seconds: the slot was freed at once
    with pytest.raises(httpx.ReadTimeout):  # a plain (non-streamed) request whose client gives up
        httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False}, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(5.0, read=0.3))  # fmt: skip
    assert _running_drops_to_zero(server)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert float(metrics.split('vlmkit_requests_total{outcome="cancelled"} ')[1].split()[0]) >= 2


def test_metrics_are_prometheus_text(server, client):
    chat(client, [{"role": "user", "content": "Hi"}], max_tokens=3)
    r = httpx.get(f"{server.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("vlmkit_requests_total", "vlmkit_queue_depth", "vlmkit_generated_tokens_total",
                 "vlmkit_time_to_first_token_seconds_bucket", "vlmkit_time_per_output_token_seconds_bucket"):  # fmt: skip
        assert f"\n{name}" in r.text, name
    health = httpx.get(f"{server.url}/health").json()
    assert health["batching"] is True and health["max_batch"] == 4 and health["context"] == CONTEXT


# ============================================================================== a second server: queue, timeout, remote images
@pytest.fixture(scope="module")
def small_server(tiny):
    model, proc = tiny
    options = check_options(port=0, max_batch=1, max_queue=1, request_timeout=1.0, allow_remote_images=True)
    with ServerThread(model, proc, options, model_name="tiny") as srv:
        yield srv


@pytest.fixture(scope="module")
def image_host():
    """A plain HTTP server on 127.0.0.1 serving one PNG at /cat.png."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = png((64, 48))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            found = self.path == "/cat.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", data
    httpd.shutdown()


def test_remote_image_when_allowed(tiny, small_server, image_host):
    model, proc = tiny
    base, data = image_host
    c = openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="unused", max_retries=0)
    reply = chat(c, [user("Describe", image_part(f"{base}/cat.png"))], max_tokens=5)
    assert reply.choices[0].message.content == reference(model, proc, [as_processor_message("Describe", 1)], [decoded(data)], 5)[0]
    with pytest.raises(openai.BadRequestError, match="HTTP 404"):
        chat(c, [user("Describe", image_part(f"{base}/missing.png"))], max_tokens=5)


def test_full_queue_is_429_and_timeout_is_504(small_server):
    c = openai.OpenAI(base_url=f"{small_server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    long = [{"role": "user", "content": "Go on"}]
    stream = chat(c, long, max_tokens=CONTEXT - 64, stream=True)
    next(iter(stream))  # running: the only slot is taken
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(lambda: chat(c, long, max_tokens=1))
        deadline = time.monotonic() + 5
        while httpx.get(f"{small_server.url}/health").json()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as refused:
            chat(c, long, max_tokens=1)
        assert refused.value.response.headers["retry-after"].isdigit()
        assert refused.value.body["type"] == "rate_limit_error" and refused.value.body["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.APIError, match="ran out of time"):  # the stream hits --request-timeout (1 s)
            for _ in stream:
                pass
        try:
            queued.result()
        except openai.APIStatusError as exc:  # it waited in the queue: it may time out too
            assert exc.status_code == 504
    with pytest.raises(openai.APIStatusError) as timeout:
        chat(c, long, max_tokens=CONTEXT - 64)
    assert timeout.value.status_code == 504 and timeout.value.body["type"] == "timeout_error"
    health = httpx.get(f"{small_server.url}/health").json()
    assert health["status"] == "ok" and health["queued"] == 0
