"""Running the app with uvicorn: :func:`run` (the ``vlmkit serve`` command, blocking) and
:class:`ServerThread` (a server in a background thread, for tests and benchmarks)."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any

from ..errors import VlmkitError
from .app import create_app
from .options import ServeOptions

__all__ = ["run", "ServerThread"]

log = logging.getLogger("vlmkit.serve")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(model: Any, processor: Any, options: ServeOptions, *, model_name: str) -> None:
    """Serve ``model`` until interrupted (Ctrl-C); the engine stops with the server."""
    import uvicorn

    if not log.handlers:  # uvicorn styles its own loggers only: show ours (batching, warnings) the same way
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if not _is_loopback(options.host) and options.api_key is None:
        log.warning("binding %s without --api-key: anyone who can reach this port can use the model", options.host)
    app = create_app(model, processor, options, model_name=model_name)
    uvicorn.run(app, host=options.host, port=options.port, log_level="info", timeout_graceful_shutdown=5)


class ServerThread:
    """``create_app(...)`` served by uvicorn on a background thread; ``options.port`` 0 picks a
    free port (see :attr:`port` / :attr:`url` after :meth:`start`). Use as a context manager."""

    def __init__(self, model: Any, processor: Any, options: ServeOptions, *, model_name: str) -> None:
        import uvicorn

        self.options = options
        self.app = create_app(model, processor, options, model_name=model_name)
        config = uvicorn.Config(self.app, host=options.host, port=options.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="vlmkit-serve-http", daemon=True)
        self.port: int | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        return f"http://{self.options.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise VlmkitError(f"the server did not start on {self.options.host}:{self.options.port}",
                                  hint="is the port in use? pass port=0 for a free one")  # fmt: skip
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
