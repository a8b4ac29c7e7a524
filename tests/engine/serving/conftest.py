"""A live server on loopback (uvicorn in a thread, a free port) for the serving tests."""

import threading
import time

import httpx
import pytest


class LiveServer:
    def __init__(self, settings, pipe=None):
        import uvicorn

        from engine.serving.api import create_app

        self.app = create_app(settings, pipe)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.monotonic() + 60
        while not (self.server.started and self.app.state.server.ready):
            if time.monotonic() > end or self.app.state.server.load_error:
                raise RuntimeError(f"server did not start: {self.app.state.server.load_error}")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)
        return self

    @property
    def state(self):
        return self.app.state.server

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture()
def live():
    """live(settings=None, pipe=None) -> a started LiveServer (stopped at the end of the test)."""
    started = []

    def make(settings=None, pipe=None):
        from engine.serving.api import ServeSettings

        s = LiveServer(settings or ServeSettings(), pipe).__enter__()
        started.append(s)
        return s

    yield make
    for s in started:
        s.__exit__(None, None, None)
