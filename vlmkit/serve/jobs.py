"""A request as the engine sees it (:class:`Job`), and what the engine sends back (events).

The HTTP side makes a :class:`Job` from a checked, tokenized request and hands it to
:meth:`vlmkit.serve.engine.Engine.submit`; the engine thread calls ``job.sink(event)`` with a
:class:`Delta` per piece of new text, then one :class:`Finished` or :class:`Failed`.
``job.sink`` must be thread-safe (the app's puts the event on its event loop's queue).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import RequestError
from .sampling import Sampling
from .text import TextTracker

__all__ = ["Job", "Delta", "Finished", "Failed", "Event"]


@dataclass(frozen=True)
class Delta:
    """New text of the answer."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The answer is complete: ``reason`` is OpenAI's ``finish_reason`` (``stop`` / ``length``)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request could not be finished (a timeout, a model error)."""

    error: RequestError


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Job:
    """One request: its model inputs ``input_ids`` ``(1, T)`` (+ the processor's image tensors),
    limits and sampling, and the engine's bookkeeping."""

    id: str
    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    pixel_attention_mask: torch.Tensor | None
    max_tokens: int
    sampling: Sampling
    text: TextTracker
    sink: Callable[[Event], Any]
    timeout_s: float | None = None
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    pending: int | None = None
    last_token_at: float | None = None
    done: bool = False

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def expired(self, now: float) -> bool:
        return self.timeout_s is not None and now - self.arrived > self.timeout_s

    def send(self, event: Event) -> None:
        """Hand ``event`` to the HTTP side (never raises: a gone client is not the engine's problem)."""
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - e.g. the event loop closed at shutdown
            pass
