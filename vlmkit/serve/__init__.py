"""``vlmkit serve``: an OpenAI-compatible chat-completions server with continuous batching.

Layout (each module's docstring has the details):

- :mod:`~vlmkit.serve.options` -- :class:`ServeOptions`, every ``vlmkit serve`` option, validated once;
- :mod:`~vlmkit.serve.protocol` -- the request as pydantic models mirroring OpenAI's, the response shapes;
- :mod:`~vlmkit.serve.errors` -- :class:`RequestError`: status + OpenAI's error JSON;
- :mod:`~vlmkit.serve.images` -- data / file / http image URLs, limits checked before decoding;
- :mod:`~vlmkit.serve.prepare` -- chat template, images, token-cost preflight, processor call;
- :mod:`~vlmkit.serve.engine` -- the decode thread: queue, slots, prefill, batched decode steps;
- :mod:`~vlmkit.serve.cache` -- :class:`SlotCache`, one KV row per running request;
- :mod:`~vlmkit.serve.sampling`, :mod:`~vlmkit.serve.text` -- per-row sampling, stop strings;
- :mod:`~vlmkit.serve.metrics` -- the Prometheus metrics;
- :mod:`~vlmkit.serve.app` -- the FastAPI routes; :mod:`~vlmkit.serve.server` -- uvicorn;
- :mod:`~vlmkit.serve.export` -- ``vlmkit export``: a Hugging Face folder for vLLM / TGI.

FastAPI, uvicorn and prometheus_client come with ``pip install 'vlmkit[serve]'``.
"""

from .options import ServeOptions, check_options

__all__ = ["ServeOptions", "check_options", "create_app", "run", "ServerThread", "Engine", "SlotCache", "RequestError"]


def __getattr__(name: str):
    """The FastAPI / uvicorn parts import on first use, so ``import vlmkit.serve`` stays light."""
    import importlib

    homes = {"create_app": "app", "run": "server", "ServerThread": "server", "Engine": "engine",
             "SlotCache": "cache", "RequestError": "errors"}  # fmt: skip
    if name in homes:
        return getattr(importlib.import_module(f"{__name__}.{homes[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
