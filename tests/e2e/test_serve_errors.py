"""``vlmkit serve`` refusals: every error class of issue 16 is a clear answer in OpenAI's JSON shape
(``error.message`` / ``type`` / ``param`` / ``code``), and none of them disturbs a running stream."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from vlmkit.serve import ServerThread, check_options  # noqa: E402

from ._serve_kit import data_url, image_part, png, user  # noqa: E402
from ._tiny_smolvlm import CONTEXT, load_tiny  # noqa: E402

KEY = "sk-errors"
AUTH = {"Authorization": f"Bearer {KEY}"}
BASE = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, proc = load_tiny()
    root = tmp_path_factory.mktemp("images")
    options = check_options(port=0, api_key=KEY, max_batch=2, max_queue=4, image_root=root, max_images=3,
                            max_image_bytes=200_000, max_image_pixels=1_000_000, max_body_bytes=5 * 1024 * 1024)  # fmt: skip
    with ServerThread(model, proc, options, model_name="tiny") as srv:
        yield srv


def _with(**fields) -> dict:
    return {**BASE, **fields}


def _image_request(*urls: str, **fields) -> dict:
    return _with(messages=[user("Look", *(image_part(u) for u in urls))], **fields)


SMALL = data_url(png((32, 32)))
CASES = [
    ("bad-json", b'{"model": "tiny", "messages": [', None, "not valid JSON"),
    ("not-an-object", b"[1, 2, 3]", None, "must be a JSON object"),
    ("unknown-field", _with(foo=1), "foo", "Unrecognized request argument supplied: foo"),
    ("unknown-part-field", _with(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "bar": 1}]}]),
     "messages[0].content[0].bar", "Unrecognized request argument supplied: bar"),
    ("unknown-part-type", _with(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "messages[0].content[0]", "input_audio"),
    ("missing-messages", {"model": "tiny"}, "messages", "Missing required parameter"),
    ("empty-messages", _with(messages=[]), "messages", "at least 1"),
    ("tool-role", _with(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "'system', 'developer', 'user'"),
    ("negative-max-tokens", _with(max_tokens=-5), "max_tokens", "greater than or equal to 1"),
    ("zero-max-completion-tokens", _with(max_tokens=None, max_completion_tokens=0), "max_completion_tokens", "greater than or equal to 1"),
    ("max-tokens-not-int", _with(max_tokens=2.5), "max_tokens", "valid integer"),
    ("huge-max-tokens", _with(max_tokens=10**12), "max_tokens", f"context of {CONTEXT} tokens"),
    ("limits-disagree", _with(max_tokens=3, max_completion_tokens=4), "max_completion_tokens", "disagree"),
    ("negative-temperature", _with(temperature=-0.1), "temperature", "greater than or equal to 0"),
    ("temperature-string", _with(temperature="hot"), "temperature", "valid number"),
    ("top-p-zero", _with(top_p=0), "top_p", "greater than 0"),
    ("top-p-above-one", _with(top_p=1.01), "top_p", "less than or equal to 1"),
    ("two-choices", _with(n=2), "n", "only n=1"),
    ("penalty", _with(presence_penalty=0.5), "presence_penalty", "not supported"),
    ("five-stops", _with(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    ("stream-options-alone", _with(stream_options={"include_usage": True}), "stream_options", "only allowed with stream"),
    ("remote-image", _image_request("https://example.com/cat.png"), "messages[0].content[0]", "--allow-remote-images"),
    ("malformed-base64", _image_request("data:image/png;base64,iVBORw0K@@@=="), "messages[0].content[0]", "malformed base64"),
    ("gif", _image_request(data_url(png((8, 8), fmt="GIF"), "image/gif")), "messages[0].content[0]", "'image/gif' is not supported"),
    ("png-says-jpeg", _image_request(data_url(png((8, 8), fmt="JPEG"), "image/png")), "messages[0].content[0]", "the bytes are JPEG"),
    ("not-an-image", _image_request(data_url(b"hello, world", "image/png")), "messages[0].content[0]", "cannot decode"),
    ("too-many-bytes", _image_request(data_url(png((300, 300), noise=True))), "messages[0].content[0]", "--max-image-bytes"),
    ("decompression-bomb", _image_request(data_url(png((2000, 2000), mode="L"))), "messages[0].content[0]", "--max-image-pixels"),
    ("too-many-images", _image_request(SMALL, SMALL, SMALL, SMALL), "messages", "at most 3"),
    ("file-outside-root", _image_request("file:///etc/hostname"), "messages[0].content[0]", "outside the image root"),
    ("image-from-assistant", _with(messages=[{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": [image_part(SMALL)]}]),
     "messages[1].content[0]", "only allowed in user messages"),
    ("mixed-detail", _with(messages=[user("Look", image_part(SMALL, "low"), image_part(SMALL, "high"))]), "messages", "mix detail"),
    ("image-cost-over-context", _image_request(data_url(png((256, 256))), max_tokens=CONTEXT - 20), "max_tokens",
     "48 text + 68 visual; image 1: 68 = 4x4 tiles + global = 17 tiles"),
]  # fmt: skip


def _post(server, body, headers=AUTH) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps({k: v for k, v in body.items() if v is not None}).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content,
                      headers={**headers, "Content-Type": "application/json"}, timeout=30)  # fmt: skip


def _check_error(response: httpx.Response, status: int, param, fragment: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and fragment in error["message"], error
    return error


@pytest.mark.parametrize("body,param,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_a_400_in_openai_shape(server, body, param, fragment):
    error = _check_error(_post(server, body), 400, param, fragment)
    assert error["type"] == "invalid_request_error"


def test_auth_model_route_and_size_errors(server):
    no_key = _post(server, BASE, headers={})
    assert _check_error(no_key, 401, None, "Missing API key")["code"] == "invalid_api_key"
    _check_error(_post(server, BASE, headers={"Authorization": "Bearer wrong"}), 401, None, "Incorrect API key")
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert _check_error(_post(server, _with(model="gpt-4o")), 404, "model", "does not exist")["code"] == "model_not_found"
    _check_error(httpx.get(f"{server.url}/v1/nothing", headers=AUTH), 404, None, "Not Found")
    _check_error(httpx.get(f"{server.url}/v1/chat/completions", headers=AUTH), 405, None, "Method Not Allowed")
    huge = b'{"model": "tiny", "pad": "' + b"x" * (6 * 1024 * 1024) + b'"}'
    _check_error(_post(server, huge), 413, None, "over this server's limit of 5242880 (--max-body-bytes)")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert err.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


@pytest.mark.slow  # a 300-token stream while every bad request above is sent (~4 s)
def test_bad_requests_do_not_disturb_a_running_stream(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Keep talking"}]
    alone = client.chat.completions.create(model="tiny", messages=messages, max_tokens=300, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=300, temperature=0, stream=True)
    pieces, started = [], threading.Event()

    def read():
        for c in stream:
            pieces.append(c.choices[0].delta.content or "" if c.choices else "")
            started.set()

    reader = threading.Thread(target=read)
    reader.start()
    started.wait(10)
    for _, body, _param, _fragment in CASES:
        assert _post(server, body).status_code == 400
    reader.join(60)
    assert "".join(pieces) == alone.choices[0].message.content
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["running"] == 0
    metrics = httpx.get(f"{server.url}/metrics").text
    invalid = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith('vlmkit_requests_total{outcome="invalid"}'))
    assert invalid >= len(CASES)
