"""Running the API with uvicorn: loopback by default, SIGTERM drains.

On SIGTERM (or Ctrl-C) the server stops accepting while it keeps listening (new API requests
get 503, /ready 503; clients still read and cancel their jobs), the batcher finishes queued and
running jobs within the grace period and ends any left with a 503 error event, open requests
get their answers, and the process exits 0.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

from .api import ServeSettings, create_app

LOOPBACK = ("localhost",)
LINGER_S = 2.0  # after draining, before the socket closes
log = logging.getLogger("overpaint.serving")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, api_key: str | None, insecure: bool) -> None:
    if not is_loopback(host) and not api_key and not insecure:
        raise ValueError(f"--host {host} listens beyond this machine: set an API key (--api-key or "
                         f"OVERPAINT_API_KEY), or pass --insecure to serve without one")


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, insecure: bool = False,
          log_level: str = "warning") -> None:
    import uvicorn

    check_host(host, settings.api_key, insecure)
    app = create_app(settings)

    state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # The first SIGTERM / SIGINT drains: the socket stays open, so new work gets a 503 and
            # clients still read their jobs; the batcher finishes what it holds within the grace
            # period and ends the rest with error events; then uvicorn shuts down (exit 0). A
            # second signal ends the grace period now (the rest get their error events) and
            # starts uvicorn's shutdown; a third Ctrl-C (SIGINT) is uvicorn's forced exit.
            if not state.draining:
                state.begin_drain()

                def drain_then_exit():
                    state.stop()
                    time.sleep(LINGER_S)  # a client polling its job sees the terminal state
                    self.should_exit = True

                threading.Thread(target=drain_then_exit, name="overpaint-drain", daemon=True).start()
                return
            if state.batcher is not None:
                state.batcher.hurry()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # stopped on purpose: exit 0, not by re-raising the signal

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=settings.grace_s + 10,
                            limit_concurrency=settings.max_queue * 4 + 64)
    print(f"overpaint: serving {settings.model} on http://{host}:{port} (the page at /, the API at /v1)", flush=True)
    Server(config).run()


class Background:
    """The app served by uvicorn in a background thread on loopback, on a free port: for tests,
    benchmarks and notebooks. ``with Background(settings, pipe) as srv: httpx.get(srv.url + "/health")``."""

    def __init__(self, settings: ServeSettings, pipe=None, startup_s: float = 120):
        import uvicorn

        self.app = create_app(settings, pipe)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="overpaint-http", daemon=True)
        self.startup_s = startup_s

    @property
    def state(self):
        """The :class:`engine.serving.api.Server` (batcher, cache, metrics)."""
        return self.app.state.server

    def __enter__(self) -> "Background":
        import time

        import httpx

        self.thread.start()
        end = time.monotonic() + self.startup_s
        while not (self.server.started and self.state.ready):
            if time.monotonic() > end or self.state.load_error or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start: {self.state.load_error or 'timed out'}")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=600)
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=60)
