"""Running the API with uvicorn: loopback by default, SIGTERM drains.

On SIGTERM (or Ctrl-C) the server stops accepting (new API requests get 503), uvicorn lets
the requests in flight finish, the batcher finishes queued and running jobs within the grace
period and ends any left with a 503 error event, and the process exits 0.
"""

from __future__ import annotations

import ipaddress
import logging
import threading

from .api import ServeSettings, create_app

LOOPBACK = ("localhost",)
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
            # SIGTERM / SIGINT: refuse new work now; the batcher finishes what it holds within the
            # grace period and ends the rest with error events, so every open request and event
            # stream gets its answer before uvicorn's own (longer) graceful-shutdown limit.
            if not state.draining:
                state.begin_drain()
                threading.Thread(target=state.stop, name="overpaint-drain", daemon=True).start()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # drained on purpose: exit 0, not by re-raising the signal

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=settings.grace_s + 10,
                            limit_concurrency=settings.max_queue * 4 + 64)
    print(f"overpaint: serving {settings.model} on http://{host}:{port} (the page at /, the API at /v1)", flush=True)
    Server(config).run()
