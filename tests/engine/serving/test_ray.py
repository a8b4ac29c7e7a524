"""Ray Serve on a local CPU Ray instance: the same routes in front of engine replicas."""

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.serving.api import ServeSettings

ray = pytest.importorskip("ray")  # pyproject's [ray] extra, part of [test]


@pytest.fixture()
def ray_url(tiny_sd15_dir, free_port, wait_ready):
    from ray import serve

    from engine.serving.ray_app import deploy

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        url = deploy(ServeSettings(model=str(tiny_sd15_dir)), port=free_port, replicas=2)
        wait_ready(url, 120)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_routes_through_ray_serve(ray_url):
    c = httpx.Client(base_url=ray_url, timeout=120)
    r = c.post("/v1/images/generations", json={"prompt": "x", "steps": 2})
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
    r = c.post("/v1/images/edits", files={"image": ("a.png", _png(), "image/png")},
               data={"prompt": "y", "source_prompt": "x", "method": "ddpm", "steps": "3"})
    assert r.status_code == 200, r.text
    inv = c.post("/v1/inversions", json={"image": base64.b64encode(_png()).decode(), "method": "ddim", "steps": 2})
    assert inv.status_code == 200, inv.text
    jid = c.post("/v1/edits", json={"inversion": inv.json()["id"], "target_prompt": "y", "method": "p2p"}).json()["id"]
    events = []
    with c.stream("GET", f"/v1/jobs/{jid}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert "step" in kinds and kinds[-1] == "done" and kinds.count("queued") == 1
    assert {e["job"] for e in events} == {jid}  # the client's job id, not the replica's
    bad = c.post("/v1/images/generations", json={"prompt": "x", "steps": 2.5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "steps"
    long = c.post("/v1/edits", json={"image": base64.b64encode(_png()).decode(), "target_prompt": "y",
                                     "method": "ddim", "steps": 500}).json()["id"]
    time.sleep(1)
    assert c.delete(f"/v1/jobs/{long}").status_code == 200
    end = time.monotonic() + 30
    while c.get(f"/v1/jobs/{long}").json()["status"] != "cancelled":
        assert time.monotonic() < end
        time.sleep(0.1)
