"""The server's Prometheus metrics (``GET /metrics``), on a registry of their own.

=========================================  =========  ==================================================
name                                       kind       what
=========================================  =========  ==================================================
``vlmkit_requests_total{outcome}``         counter    finished requests: ``stop``, ``length``,
                                                      ``cancelled``, ``timeout``, ``error``,
                                                      ``rejected`` (429), ``invalid`` (4xx)
``vlmkit_queue_depth``                     gauge      requests waiting for a slot
``vlmkit_running_requests``                gauge      requests decoding now (batch rows)
``vlmkit_prompt_tokens_total``             counter    prompt tokens prefilled
``vlmkit_generated_tokens_total``          counter    tokens generated
``vlmkit_time_to_first_token_seconds``     histogram  from arrival to the first token
``vlmkit_time_per_output_token_seconds``   histogram  between consecutive tokens of a request
``vlmkit_request_duration_seconds``        histogram  from arrival to the last token
``vlmkit_batch_rows``                      histogram  rows decoded together, per decode step
=========================================  =========  ==================================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The counters, gauges and histograms above; :meth:`render` is the exposition text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlmkit_requests", "Finished requests by outcome.", ["outcome"], registry=r)
        self.queue_depth = Gauge("vlmkit_queue_depth", "Requests waiting for a decode slot.", registry=r)
        self.running = Gauge("vlmkit_running_requests", "Requests decoding now (batch rows).", registry=r)
        self.prompt_tokens = Counter("vlmkit_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generated_tokens = Counter("vlmkit_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("vlmkit_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_TTFT_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("vlmkit_time_per_output_token_seconds", "Time between consecutive tokens of a request.",
                              buckets=_TPOT_BUCKETS, registry=r)  # fmt: skip
        self.duration = Histogram("vlmkit_request_duration_seconds", "Arrival to last token.",
                                  buckets=_DURATION_BUCKETS, registry=r)  # fmt: skip
        self.batch_rows = Histogram("vlmkit_batch_rows", "Rows decoded together, per decode step.",
                                    buckets=_ROWS_BUCKETS, registry=r)  # fmt: skip

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
