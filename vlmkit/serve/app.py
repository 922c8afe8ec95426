"""The FastAPI application: OpenAI's chat-completions routes on one :class:`~vlmkit.serve.engine.Engine`.

==============================  ===============================================================
route                           answer
==============================  ===============================================================
``POST /v1/chat/completions``   a ``chat.completion``, or with ``stream: true`` server-sent
                                ``chat.completion.chunk`` events ending ``data: [DONE]``
``GET /v1/models``              the one model this server runs
``GET /health``                 ``{"status": "ok", ...}``: batching, slots, queue (503 if the
                                engine stopped)
``GET /metrics``                Prometheus text (:mod:`vlmkit.serve.metrics`)
==============================  ===============================================================

Every error is OpenAI's JSON shape (:class:`~vlmkit.serve.errors.RequestError`). With an API
key, the ``/v1`` routes need ``Authorization: Bearer KEY`` (401 otherwise); ``/health`` and
``/metrics`` stay open for monitoring. A client that disconnects cancels its request: it leaves
the queue, or its slot is freed at the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .engine import Engine
from .errors import RequestError, bad_request
from .images import ImageLimits
from .jobs import Delta, Failed, Finished, Job
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .options import ServeOptions
from .prepare import Preparer
from .protocol import ChatCompletionRequest, chunk, completion, parse_request, usage
from .sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Sampling
from .text import TextTracker

__all__ = ["create_app"]

log = logging.getLogger("vlmkit.serve")
_GONE = object()  # put on a request's event queue when its client disconnected


class _Server:
    """What the routes share: the engine, the preparer, the options and the model's id."""

    def __init__(self, model: Any, processor: Any, options: ServeOptions, model_name: str) -> None:
        self.options, self.model_name, self.processor = options, model_name, processor
        self.created = int(time.time())
        self.metrics = Metrics()
        self.engine = Engine(model, max_batch=options.max_batch, max_queue=options.max_queue, metrics=self.metrics)
        context = self.engine.context
        self.max_images = options.max_images if options.max_images is not None else max(1, context // processor.image_seq_len)
        limits = ImageLimits(options.max_image_bytes, options.max_image_pixels, options.allow_remote_images, options.image_root)
        self.preparer = Preparer(processor, context=context, max_images=self.max_images, limits=limits)
        self.body_limit = options.max_body_bytes

    def job(self, request: ChatCompletionRequest, prepared: Any, sink: Any) -> Job:
        temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
        sampling = Sampling(temperature, DEFAULT_TOP_P if request.top_p is None else request.top_p, request.seed)
        tracker = TextTracker(lambda ids: self.processor.decode(ids, skip_special_tokens=True), request.stop or ())
        return Job(f"chatcmpl-{uuid.uuid4().hex}", prepared.input_ids, prepared.pixel_values, prepared.pixel_attention_mask,
                   prepared.max_tokens, sampling, tracker, sink, timeout_s=self.options.request_timeout)  # fmt: skip

    def health(self) -> dict[str, Any]:
        engine = self.engine
        return {"status": "ok" if engine.alive else "error", "model": self.model_name, "batching": engine.batching,
                "batching_note": engine.batching_note, "max_batch": engine.max_batch, "max_queue": engine.max_queue,
                "context": engine.context, "max_images": self.max_images, **engine.stats()}  # fmt: skip


def create_app(model: Any, processor: Any, options: ServeOptions, *, model_name: str) -> FastAPI:
    """The app for ``model`` and its ``processor``; the engine thread starts now and stops with the app."""
    server = _Server(model, processor, options, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(server.engine.close)

    app = FastAPI(title="vlmkit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_exception_handler(RequestError, _error_handler(server))
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    _routes(app, server)
    log.info("serving %s: %s, %d slots, queue %d", model_name, server.engine.batching_note, server.engine.max_batch, options.max_queue)
    return app


def _routes(app: FastAPI, server: _Server) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _authorize(request, server.options.api_key)
        req = parse_request(await _body(request, server.body_limit))
        if req.model != server.model_name:
            raise RequestError(f"The model {req.model!r} does not exist; this server runs {server.model_name!r}",
                               status=404, param="model", code="model_not_found", hint="GET /v1/models lists it")  # fmt: skip
        prepared = await run_in_threadpool(server.preparer.prepare, req)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = server.job(req, prepared, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        server.engine.submit(job)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(server, job, events, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        return await _answer(server, request, job, events)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, server.options.api_key)
        entry = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "vlmkit",
                 "max_model_len": server.engine.context}  # fmt: skip
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> JSONResponse:
        body = server.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ============================================================================== answers
async def _answer(server: _Server, request: Request, job: Job, events: asyncio.Queue) -> Response:
    """Collect the whole answer; a disconnect cancels the job."""
    watcher = asyncio.create_task(_watch_disconnect(request, events))
    text: list[str] = []
    try:
        while True:
            event = await events.get()
            if event is _GONE:
                server.engine.cancel(job)
                return Response(status_code=499)
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, Finished):
                use = usage(event.prompt_tokens, event.completion_tokens)
                return JSONResponse(completion(job.id, int(time.time()), server.model_name, "".join(text), event.reason, use))
            elif isinstance(event, Failed):
                return _error_json(event.error)
    finally:
        watcher.cancel()
        if not job.done:
            server.engine.cancel(job)


async def _sse(server: _Server, job: Job, events: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content chunks, the finish chunk, (usage), ``[DONE]``.
    A client that goes away cancels this generator, and with it the job."""
    created, name = int(time.time()), server.model_name
    try:
        yield _event(chunk(job.id, created, name, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _event(chunk(job.id, created, name, {"content": event.text}))
            elif isinstance(event, Finished):
                yield _event(chunk(job.id, created, name, {}, event.reason))
                if include_usage:
                    yield _event(chunk(job.id, created, name, None, use=usage(event.prompt_tokens, event.completion_tokens)))
                break
            elif isinstance(event, Failed):
                yield _event(event.error.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        if not job.done:
            server.engine.cancel(job)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _watch_disconnect(request: Request, events: asyncio.Queue) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(_GONE)


# ============================================================================== requests
def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode()):
        return
    what = "Incorrect API key provided" if token else "Missing API key: no 'Authorization: Bearer KEY' header"
    raise RequestError(what, status=401, code="invalid_api_key", hint="send the key the server was started with (--api-key)")


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one larger than ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise _too_large(len(body), limit)
    if not body:
        raise bad_request("the request body is empty; expected a JSON object", None)
    return bytes(body)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(f"the request body is {size} bytes, over this server's limit of {limit} (--max-body-bytes)",
                        status=413, hint="send fewer or smaller images")  # fmt: skip


# ============================================================================== errors
def _error_json(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _error_handler(server: _Server):
    async def handle(_request: Request, exc: RequestError) -> JSONResponse:
        if exc.status != 429:  # the engine counts its own refusals
            server.metrics.requests.labels("invalid").inc()
        return _error_json(exc)

    return handle


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    """Routing errors (404 unknown path, 405 wrong method) in OpenAI's shape."""
    return _error_json(RequestError(f"{exc.detail}", status=exc.status_code, hint="see docs/serving.md for the routes"))


async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, answered as a 500 in OpenAI's shape; the server goes on."""
    log.error("internal error", exc_info=exc)
    return _error_json(RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error",
                                    hint="this is a bug in vlmkit; please report it with the server log"))  # fmt: skip
