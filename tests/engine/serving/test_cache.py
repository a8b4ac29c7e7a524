"""The inversion cache: content-derived ids, LRU by bytes, persistence, no paths from requests."""

import base64
import io

import numpy as np
import torch
from PIL import Image

from engine.prompts import Conditioning
from engine.serving.api import ServeSettings
from engine.serving.cache import InversionCache, inversion_id, nbytes


def fake_inversion(n: int = 1):
    from engine.editing import Inversion

    z = torch.zeros(n, 4, 4, 4)  # [B, C, h, w]
    return Inversion("ddim", z, torch.zeros(3, n, 4, 4, 4), torch.tensor([999, 500, 1]),
                     Conditioning(torch.zeros(n, 77, 8)))


def test_ids_follow_content_and_settings():
    a = inversion_id(b"img", {"method": "ddim", "steps": 3}, "m1")
    assert a == inversion_id(b"img", {"steps": 3, "method": "ddim"}, "m1")  # key order does not matter
    assert len({a, inversion_id(b"img2", {"method": "ddim", "steps": 3}, "m1"),
                inversion_id(b"img", {"method": "ddim", "steps": 4}, "m1"),
                inversion_id(b"img", {"method": "ddim", "steps": 3}, "m2")}) == 4


def test_lru_by_bytes_and_persistence(tmp_path):
    size = nbytes(fake_inversion())
    cache = InversionCache(max_bytes=2 * size)
    keys = [inversion_id(bytes([i]), {}, "m") for i in range(3)]
    for k in keys[:2]:
        cache.put(k, fake_inversion())
    assert cache.get(keys[0]) is not None  # now the most recent
    cache.put(keys[2], fake_inversion())
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.bytes <= 2 * size
    assert cache.get("../../etc/passwd") is None and cache.get("inv_" + "z" * 32) is None

    disk = InversionCache(max_bytes=1 << 20, folder=tmp_path / "c")
    disk.put(keys[0], fake_inversion())
    assert (tmp_path / "c" / f"{keys[0]}.safetensors").is_file()
    again = InversionCache(max_bytes=1 << 20, folder=tmp_path / "c")  # a restarted server
    assert again.get(keys[0]) is not None and again.hits == 1
    path = tmp_path / "c" / f"{keys[0]}.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert InversionCache(folder=tmp_path / "c").get(keys[0]) is None and not path.exists()  # corrupt: dropped
    off = InversionCache(max_bytes=0)
    off.put(keys[0], fake_inversion())
    assert off.get(keys[0]) is None


def test_server_cache_dir_survives_a_restart(live, sd15_pipe, tmp_path):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(3).random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    body = {"image": base64.b64encode(buf.getvalue()).decode(), "method": "ddim", "steps": 2}
    settings = ServeSettings(cache_dir=str(tmp_path / "cache"))
    first = live(settings, sd15_pipe).client.post("/v1/inversions", json=body).json()
    assert first["cached"] is False and (tmp_path / "cache" / f"{first['id']}.safetensors").is_file()
    second = live(settings, sd15_pipe).client.post("/v1/inversions", json=body).json()
    assert second == {**first, "cached": True}


def test_api_routes_answer_503_while_the_model_loads():
    import threading
    import time

    import httpx
    import uvicorn

    from engine.serving.api import create_app

    release = threading.Event()

    def connect(server):  # a model that takes a while to load
        release.wait(30)
        raise RuntimeError("no model in this test")

    app = create_app(ServeSettings(), connect=connect)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading" and r.headers["retry-after"]
        assert httpx.get(f"{url}/ready").status_code == 503 and httpx.get(f"{url}/health").status_code == 200
        release.set()
        end = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code != 500:  # a failed load is reported, not hidden
            assert time.monotonic() < end
            time.sleep(0.05)
        assert "no model in this test" in httpx.get(f"{url}/health").json()["error"]
    finally:
        release.set()
        srv.should_exit = True
        thread.join(timeout=30)
