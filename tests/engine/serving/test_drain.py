"""SIGTERM under load: the server stops accepting (while it still listens: new work gets 503,
clients read their jobs), finishes or ends every accepted job with an error event, and exits 0
(the real `overpaint serve` process)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx


def test_sigterm_under_load_loses_nothing(tiny_sd15_dir, free_port, wait_ready):
    port = free_port
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--model", str(tiny_sd15_dir), "--port",
                             str(port), "--grace", "5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 90, alive=lambda: proc.poll() is None)
        results, events, ids = {}, [], []

        def request(i):
            try:
                r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 15, "seed": i},
                               timeout=120)
                results[i] = (r.status_code, r.json())
            except httpx.TransportError as e:  # would be a lost request
                results[i] = (None, repr(e))

        def stream():
            jid = httpx.post(f"{url}/v1/edits", json={"image": _png_b64(), "target_prompt": "y", "method": "ddim",
                                                      "steps": 400}, timeout=30).json()["id"]
            ids.append(jid)
            with httpx.stream("GET", f"{url}/v1/jobs/{jid}/events", timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))

        threads = [threading.Thread(target=request, args=(i,)) for i in range(6)] + [threading.Thread(target=stream)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # all accepted and running
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # draining: still listening; new work is refused, clients still read their jobs
        late = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 1}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining", late.text
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 503
        assert httpx.get(f"{url}/v1/jobs/{ids[0]}", timeout=10).json()["status"] in ("queued", "running")
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        assert len(results) == 6
        for status, body in results.values():
            assert status == 200 or (status == 503 and body["error"]["code"] in ("shutdown", "draining")), body
        assert any(status == 200 for status, _ in results.values()), results  # in-flight work finished within the grace
        # the long job outlived the grace period: its stream still got a terminal event
        assert events and events[-1]["type"] == "error" and events[-1]["error"]["code"] == "shutdown", events[-3:]
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read().decode(errors="replace")
        assert "Traceback" not in out, out


def _png_b64() -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()
