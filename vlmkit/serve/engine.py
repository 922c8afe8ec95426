"""The decode engine: continuous batching at token granularity, on one background thread.

Requests wait in a bounded queue (:meth:`Engine.submit` refuses with a 429 when it is full).
Whenever a decode slot is free, the engine thread takes the next request, runs its prefill alone
(``model.embed`` for the images and prompt, one backbone pass into a one-row
:class:`~vlmkit.kv_cache.KVCache`, the first token), then moves its keys/values into a row of the
:class:`~vlmkit.serve.cache.SlotCache`. Every step then decodes all running rows at once: one
backbone ``forward`` over ``(B, 1)`` new tokens with each row's attention mask and position ids.
A row leaves as soon as it stops (a stop id or stop string, ``max_tokens``, its timeout, or a
cancel when the client went away) and its slot is free for the next request at the next step.

Each row computes exactly what it would alone: its own keys, its own positions, padding masked
out; greedy rows therefore pick the same tokens as :func:`vlmkit.generation.generate` run alone
(``tests/e2e/test_serve_engine.py`` checks it), and a seeded sampled row draws from its own
generator.

Backbones whose cache is not a :class:`~vlmkit.kv_cache.KVCache` (e.g. ``hf_causal_lm``, which
uses transformers' ``DynamicCache``) cannot share the slot cache: the engine then runs one request
at a time through :func:`vlmkit.generation.generate` and says so (:attr:`Engine.batching_note`,
shown by ``GET /health`` and logged at startup).
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
import threading
import time
from typing import Any

import torch

from ..errors import VlmkitError
from ..generation import context_length as backbone_context
from ..generation import default_stop_ids, generate
from ..kv_cache import KVCache
from .cache import SlotCache
from .errors import QueueFullError, RequestError
from .jobs import Delta, Failed, Finished, Job
from .metrics import Metrics
from .sampling import choose

__all__ = ["Engine", "batching_support", "context_length"]

log = logging.getLogger("vlmkit.serve")


def batching_support(backbone: Any) -> tuple[bool, str]:
    """``(can batch, why)``: the backbone must make a vlmkit ``KVCache`` and take ``cache``,
    ``attention_mask`` and ``position_ids`` in ``forward``."""
    name = type(backbone).__name__
    new_cache = getattr(backbone, "new_cache", None)
    if not callable(new_cache):
        return False, f"{name} has no new_cache(): requests run one at a time"
    params = inspect.signature(backbone.forward).parameters
    missing = [p for p in ("attention_mask", "position_ids", "cache") if p not in params]
    if missing:
        return False, f"{name}.forward takes no {', '.join(missing)}: requests run one at a time"
    probe = new_cache(1, 1)
    if not isinstance(probe, KVCache):
        return False, (f"{name}.new_cache() makes a {type(probe).__name__}, not a vlmkit KVCache: requests run "
                       "one at a time (no continuous batching)")  # fmt: skip
    return True, f"continuous batching on {name}'s KVCache interface"


def context_length(model: Any) -> int:
    """The backbone's context (:func:`vlmkit.generation.context_length`); an error when it does not say."""
    value = backbone_context(model.backbone)
    if value is None or value < 2:
        raise VlmkitError(f"the backbone {type(model.backbone).__name__} does not say its context length "
                          "(max_position_embeddings)", hint="set max_position_embeddings in the model's spec")  # fmt: skip
    return value


class Engine:
    """Runs :class:`~vlmkit.serve.jobs.Job`\\ s on ``model``; see the module docstring."""

    def __init__(self, model: Any, *, max_batch: int, max_queue: int, metrics: Metrics | None = None) -> None:
        self.model, self.backbone = model, model.backbone
        self.metrics = metrics or Metrics()
        self.context = context_length(model)
        self.batching, self.batching_note = batching_support(self.backbone)
        self.max_batch = max_batch if self.batching else 1
        self.max_queue = max_queue
        self.stop_ids = frozenset(default_stop_ids(model))
        self._cache = SlotCache(self.backbone.new_cache(1, 1), self.max_batch, self.context) if self.batching else None
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._mean_s = 1.0  # running mean of request durations, for Retry-After
        self.error: BaseException | None = None  # set if the engine thread itself died
        self._thread = threading.Thread(target=self._loop, name="vlmkit-serve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the HTTP side
    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`~vlmkit.serve.errors.QueueFullError` (429) when the queue is full."""
        with self._cond:
            if self._closed or not self.alive:
                raise RequestError("the server is shutting down", status=503, type="server_error")
            free = self.max_batch - len(self._running)
            if len(self._waiting) - free >= self.max_queue:
                self.metrics.requests.labels("rejected").inc()
                raise QueueFullError(len(self._waiting), self.max_queue, self.retry_after())
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop ``job`` (its client went away): dropped from the queue now, or its slot freed at
        the next step."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.queue_depth.set(len(self._waiting))
                self._count(job, "cancelled")

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead of it at the recent mean duration."""
        ahead = (len(self._waiting) + 1) / max(1, self.max_batch)
        return max(1, min(60, math.ceil(ahead * self._mean_s)))

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"running": len(self._running), "queued": len(self._waiting)}

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def close(self) -> None:
        """Stop the engine thread; queued and running requests fail with a 503."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._next_round():
                    pass
        except BaseException as exc:  # a bug: every request gets an answer, /health says so
            self.error = exc
            log.exception("the engine thread died")
        finally:
            self._fail_all(RequestError("the server is shutting down", status=503, type="server_error"))

    def _next_round(self) -> bool:
        """Admit what fits, then one decode step. False once closed."""
        with self._cond:
            while not self._closed and not self._waiting and not self._running:
                self._cond.wait()
            if self._closed:
                return False
            admitted = self._admissions()
        for job in admitted:
            self._start(job)
        if self._running:
            self._step()
        return True

    def _admissions(self) -> list[Job]:
        """Fail the queued jobs past their timeout, then pop those that fit into free slots. Holds the lock."""
        now = time.monotonic()
        for job in [j for j in self._waiting if j.expired(now)]:
            self._waiting.remove(job)
            self._fail(job, _timeout(job), "timeout")
        out = []
        while self._waiting and len(self._running) + len(out) < self.max_batch:
            out.append(self._waiting.popleft())
        self.metrics.queue_depth.set(len(self._waiting))
        return out

    def _start(self, job: Job) -> None:
        """Prefill ``job`` alone and emit its first token; it joins the batch unless it is done."""
        if job.cancelled.is_set():
            return self._count(job, "cancelled")
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        if not self.batching:
            return self._run_alone(job)
        try:
            embeds = self.model.embed(job.input_ids, job.pixel_values, job.pixel_attention_mask)
            row_cache = self.backbone.new_cache(1, job.prompt_tokens)
            hidden = self.backbone(embeds, cache=row_cache)
            logits = self.backbone.logits(hidden[:, -1:])[:, -1]
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            return self._fail(job, _model_error(exc), "error")
        if not self._emit(job, choose(logits, [job.sampling])[0]):
            self._cache.add(row_cache)
            self._running.append(job)
            self.metrics.running.set(len(self._running))

    def _step(self) -> None:
        """One token for every running row; rows that stopped leave."""
        rows = self._running
        self.metrics.batch_rows.observe(len(rows))
        try:
            tokens = torch.tensor([[job.pending] for job in rows], device=self.model.device)
            self._cache.reserve(1)
            mask, positions = self._cache.step_inputs()
            hidden = self.backbone(self.backbone.embed(tokens), attention_mask=mask, position_ids=positions, cache=self._cache)
            picked = choose(self.backbone.logits(hidden)[:, -1], [job.sampling for job in rows])
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            error = _model_error(exc)
            for job in list(rows):
                self._fail(job, error, "error")
            self._running = []
            self._cache.rows, self._cache.length = 0, 0
            return
        leaving = [i for i, (job, token) in enumerate(zip(rows, picked)) if self._emit(job, token)]
        for i in reversed(leaving):  # highest first: the row moved into i is never one that leaves
            if self._cache.remove(i) is not None:
                rows[i] = rows[-1]
            rows.pop()
        self.metrics.running.set(len(rows))

    def _emit(self, job: Job, token: int) -> bool:
        """Record and stream ``token``; True when ``job`` is done (and has been answered)."""
        now = time.monotonic()
        job.generated += 1
        self.metrics.generated_tokens.inc()
        if job.last_token_at is None:
            self.metrics.ttft.observe(now - job.arrived)
        else:
            self.metrics.tpot.observe(now - job.last_token_at)
        job.last_token_at = now
        if job.cancelled.is_set():
            self._count(job, "cancelled")
            return True
        if token in self.stop_ids:
            return self._finish(job, "stop")
        self._send_text(job, job.text.push(token))
        if job.text.stopped:
            return self._finish(job, "stop")
        if job.generated >= job.max_tokens:
            return self._finish(job, "length")
        if job.expired(now):
            self._fail(job, _timeout(job), "timeout")
            return True
        job.pending = token
        return False

    def _run_alone(self, job: Job) -> None:
        """A backbone that cannot share the slot cache: :func:`vlmkit.generation.generate` for
        this request alone, each token through :meth:`_emit`."""

        class _Done(Exception):
            pass

        def on_step(ids: list[int]) -> None:
            if self._emit(job, ids[0]):
                raise _Done

        s = job.sampling
        try:
            generate(self.model, job.input_ids, pixel_values=job.pixel_values, pixel_attention_mask=job.pixel_attention_mask,
                     max_new_tokens=job.max_tokens, do_sample=not s.greedy, temperature=s.temperature if not s.greedy else 1.0,
                     top_p=s.top_p, seed=None if s.seed is None else s.seed % 2**63, eos_token_id=sorted(self.stop_ids),
                     streamer=on_step, allow_text_only=False)  # fmt: skip
        except _Done:
            pass
        except Exception as exc:  # noqa: BLE001 - this request fails, the server goes on
            return self._fail(job, _model_error(exc), "error")
        if not job.done:  # generate ran out of steps without a stop token reaching _emit
            self._finish(job, "length")

    # ------------------------------------------------------------------ answers
    def _send_text(self, job: Job, text: str) -> None:
        if text:
            job.send(Delta(text))

    def _finish(self, job: Job, reason: str) -> bool:
        self._send_text(job, job.text.finish())
        job.send(Finished(reason, job.prompt_tokens, job.generated))
        self._count(job, reason)
        return True

    def _fail(self, job: Job, error: RequestError, outcome: str) -> None:
        job.send(Failed(error))
        self._count(job, outcome)

    def _count(self, job: Job, outcome: str) -> None:
        if job.done:
            return
        job.done = True
        elapsed = time.monotonic() - job.arrived
        self.metrics.requests.labels(outcome).inc()
        if outcome in ("stop", "length"):
            self.metrics.duration.observe(elapsed)
            self._mean_s = 0.9 * self._mean_s + 0.1 * elapsed

    def _fail_all(self, error: RequestError) -> None:
        with self._cond:
            jobs = list(self._waiting) + list(self._running)
            self._waiting.clear()
            self._running = []
        for job in jobs:
            self._fail(job, error, "error")


def _timeout(job: Job) -> RequestError:
    return RequestError(
        f"the request ran out of time: {job.timeout_s:g} s (--request-timeout) after {job.generated} tokens",
        status=504, type="timeout_error", code="timeout", hint="ask for fewer max_tokens, or retry when the server is less busy",
    )  # fmt: skip


def _model_error(exc: Exception) -> RequestError:
    """A failure while running the model: a 400 for a vlmkit error about this input, else a 500."""
    if isinstance(exc, VlmkitError):
        return RequestError(exc.message, hint=exc.hint)
    log.exception("model error")
    return RequestError(f"the model failed on this request: {type(exc).__name__}: {exc}", status=500, type="server_error")
