"""A live server on loopback (engine.serving.server.Background: uvicorn in a thread, a free port)."""

import pytest


@pytest.fixture()
def live():
    """live(settings=None, pipe=None) -> a started server (stopped at the end of the test)."""
    from engine.serving.api import ServeSettings
    from engine.serving.server import Background

    started = []

    def make(settings=None, pipe=None):
        s = Background(settings or ServeSettings(), pipe).__enter__()
        started.append(s)
        return s

    yield make
    for s in started:
        s.__exit__(None, None, None)


@pytest.fixture()
def free_port():
    """A free loopback port (for servers started in another process)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def wait_ready():
    """wait_ready(url, seconds, alive=lambda: True): poll GET url/ready until 200."""
    import time

    import httpx

    def wait(url: str, seconds: float = 120, alive=lambda: True) -> None:
        end = time.monotonic() + seconds
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < end and alive(), f"{url} did not become ready"
            time.sleep(0.1)

    return wait
