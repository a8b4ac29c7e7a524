"""The HTTP API over loopback on tiny models: every route, bad inputs as OpenAI-shaped 4xx errors
(and the server stays up), cancellation, queue limits, timeouts, fault injection."""

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from engine.serving.api import ServeSettings


def png(size=(32, 32), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def edit_form(**extra):
    return {"prompt": "a blue circle", "source_prompt": "a red circle", "method": "ddim", "steps": "2", **extra}


def error_of(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


@pytest.fixture()
def server(live, sd15_pipe):
    return live(ServeSettings(max_body_bytes=2 << 20, max_pixels=512 * 512), sd15_pipe)


def test_routes(server):
    c = server.client
    assert c.get("/health").json()["status"] == "ok" and c.get("/ready").status_code == 200
    assert "<form" in c.get("/").text
    r = c.post("/v1/images/edits", files={"image": ("a.png", png(), "image/png")}, data=edit_form())
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert out.size == (32, 32)
    r = c.post("/v1/images/edits", files={"image": ("a.png", png(), "image/png")}, data=edit_form(size="48x40", n="2", method="ddpm"))
    got = [base64.b64decode(d["b64_json"]) for d in r.json()["data"]]
    assert [Image.open(io.BytesIO(b)).size for b in got] == [(48, 40)] * 2
    assert got[0] != got[1]  # n variations: seeds seed, seed + 1
    r = c.post("/v1/images/generations", json={"prompt": "x", "steps": 2, "n": 2, "size": "32x32"})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    r = c.post("/v1/images/generations", json={"prompt": "x", "steps": 2, "size": "32x32", "chroma_key": [0, 177, 64],
                                                "background": "transparent"})  # TKG-DM + matte: RGBA PNG
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).mode == "RGBA"
    r = c.post("/v1/images/edits", files={"image": ("a.png", png(), "image/png")},
               data=edit_form(method="masactrl", start_step="1", mask_words='[["circle"], ["circle"]]'))
    assert r.status_code == 200, r.text
    inv = c.post("/v1/inversions", json={"image": b64(png()), "source_prompt": "a red circle", "method": "ddpm",
                                         "steps": 3}).json()
    assert inv["id"].startswith("inv_") and inv["cached"] is False
    again = c.post("/v1/inversions", json={"image": b64(png()), "source_prompt": "a red circle", "method": "ddpm",
                                           "steps": 3}).json()
    assert again["id"] == inv["id"] and again["cached"] is True  # same bytes and settings: same id, no work
    job = c.post("/v1/edits", json={"inversion": inv["id"], "target_prompt": "a blue circle", "method": "ddpm"})
    assert job.status_code == 202
    jid = job.json()["id"]
    events = []
    with c.stream("GET", f"/v1/jobs/{jid}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
    assert events[0] in ("queued", "stage") and events[-1] == "done" and "step" in events
    got = c.get(f"/v1/jobs/{jid}").json()
    assert got["status"] == "succeeded" and got["data"][0]["b64_json"]
    assert c.delete(f"/v1/jobs/{jid}").json()["status"] == "succeeded"  # finished: nothing to cancel
    metrics = c.get("/metrics").text
    assert 'overpaint_inversion_cache_total{result="hit"}' in metrics and "overpaint_rows_per_step_bucket" in metrics
    assert 'overpaint_request_seconds_count{method="ddim",route="images/edits"}' in metrics


def _finish(c, job):
    assert job.status_code == 202, job.text
    jid = job.json()["id"]
    for _ in range(600):  # bounded wait
        got = c.get(f"/v1/jobs/{jid}").json()
        if got["status"] in ("succeeded", "failed"):
            return got
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_optimisation_methods_over_http(server):
    """null-text (and P2P on it), pix2pix-zero with a direction instead of a prompt, and Imagic
    (its inversion for the prompt itself; its steps are its generation's)."""
    c = server.client
    r = c.post("/v1/images/edits", files={"image": ("a.png", png(), "image/png")},
               data=edit_form(method="null-text", inner_steps="1", guidance_scale="3"))
    assert r.status_code == 200, r.text
    r = c.post("/v1/images/edits", files={"image": ("a.png", png(), "image/png")},
               data=edit_form(method="p2p", inversion_method="null-text", inner_steps="1"))
    assert r.status_code == 200, r.text
    got = _finish(c, c.post("/v1/edits", json={"image": b64(png()), "source_prompt": "a red circle", "steps": 2,
                                               "method": "pix2pix-zero", "direction": ["red", "blue"],
                                               "cross_attention_guidance": 0.05}))
    assert got["status"] == "succeeded", got
    got = _finish(c, c.post("/v1/edits", json={"image": b64(png()), "target_prompt": "a blue circle", "steps": 2,
                                               "method": "imagic", "embed_steps": 2, "tune_steps": 2, "tune": "lora",
                                               "alpha": 1.5, "seed": 3}))
    assert got["status"] == "succeeded", got
    r = c.post("/v1/images/edits", files={"image": ("a.png", png(), "image/png")},
               data=edit_form(method="imagic", tune="half", embed_steps="1", tune_steps="1"))
    assert error_of(r, 400)["message"].startswith("tune must be 'full' or 'lora'")


def bomb(side: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_bad_input_corpus(server):
    c = server.client
    good = png()
    post = lambda files=None, data=None, **kw: c.post("/v1/images/edits", files=files, data=data, **kw)  # noqa: E731
    img = lambda data, name="a.png", kind="image/png": {"image": (name, data, kind)}  # noqa: E731
    cases = [
        (post(img(b"not an image at all"), edit_form()), 400, "image"),  # corrupt / wrong type
        (post(img(good[:60]), edit_form()), 400, "image"),  # truncated
        (post(img(b""), edit_form()), 400, "image"),  # empty
        (post(img(bomb(30000)), edit_form()), 413, "image"),  # decompression bomb: from the header
        (post(img(bomb(1000)), edit_form()), 413, "image"),  # over this server's pixel limit
        (post(img(b"x" * (3 << 20)), edit_form()), 413, None),  # body over the limit
        (post(img(good), {"source_prompt": "x", "method": "ddim"}), 400, "prompt"),  # missing field
        (post(None, edit_form()), 400, "image"),
        (post(img(good), edit_form(steps="2.5")), 400, "steps"),  # bad numbers
        (post(img(good), edit_form(guidance_scale="inf")), 400, "guidance_scale"),
        (post(img(good), edit_form(seed="abc")), 400, "seed"),
        (post(img(good), edit_form(n="0")), 400, "n"),
        (post(img(good), edit_form(size="big")), 400, "size"),
        (post(img(good), edit_form(method="magic")), 400, "method"),  # unknown method
        (post(img(good), edit_form(cross_replace_steps="0.5")), 400, "cross_replace_steps"),  # not ddim's
        (post(img(good), edit_form(prompt="word " * 90)), 400, None),  # oversized prompt
        (post(img(good), edit_form(response_format="url")), 400, "response_format"),
        (post(img(good), edit_form(seed="--3")), 400, "seed"),  # passed a digits check, then int() failed: 500
        (post(img(good), edit_form(n="2")), 400, "n"),  # ddim: n identical images
        (post(img(good), edit_form(n="2", method="ddpm", inversion="inv_" + "0" * 32)), 400, "n"),  # a fixed inversion
        (post(img(good), edit_form(stream="true")), 400, "stream"),
        (post(img(good), edit_form(partial_images="2")), 400, "partial_images"),
        (post(img(good), edit_form(output_format="gif")), 400, "output_format"),
        (post(img(good), edit_form(background="transparent")), 400, "background"),
        (c.post("/v1/images/edits", content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data; "
                                                                          "boundary=xx"}), 400, None),
        (c.post("/v1/images/edits", json={"prompt": "x"}), 400, None),  # JSON where multipart is expected
        (c.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"}), 400,
         None),
        (c.post("/v1/images/generations", json=["a list"]), 400, None),
        (c.post("/v1/images/generations", json={"prompt": 3}), 400, "prompt"),
        (c.post("/v1/images/generations", json={"prompt": "x", "steps": -1}), 400, "steps"),
        (c.post("/v1/images/generations", json={"prompt": "x", "background": "transparent"}), 400, "background"),
        (c.post("/v1/images/generations", json={"prompt": "x", "steps": 2, "chroma_key": "purple"}), 400, None),
        (c.post("/v1/images/generations", json={"prompt": "x", "steps": 2, "chroma_key": "green",
                                                "chroma_direction": [1, "up", 0, 0]}), 400, None),
        (c.post("/v1/images/generations", json={"prompt": "x", "frobnicate": 1}), 400, "frobnicate"),
        (c.post("/v1/images/generations", json={"prompt": "x", "chroma_key": "green", "background": "transparent",
                                                "output_format": "jpeg"}), 400, "output_format"),
        (c.post("/v1/edits", json={"inversion": "inv_" + "0" * 32, "target_prompt": "y"}), 404, "inversion"),
        (c.post("/v1/edits", json={"inversion": "../../etc/passwd", "target_prompt": "y"}), 404, "inversion"),
        (c.post("/v1/edits", json={"image": "%%%", "target_prompt": "y"}), 400, "image"),
        (c.post("/v1/inversions", json={"image": b64(good), "method": "p2p"}), 400, "method"),
        (c.get("/v1/jobs/job_nope"), 404, "id"),
        (c.delete("/v1/jobs/job_nope"), 404, "id"),
    ]
    for r, status, param in cases:
        body = error_of(r, status)
        if param is not None:
            assert body["param"] == param, (body, param)
    assert c.get("/ready").status_code == 200  # still up
    assert c.post("/v1/images/edits", files=img(good), data=edit_form()).status_code == 200


def test_streamed_body_over_the_limit_is_413_before_reading_it_all(server):
    def chunks():
        for _ in range(64):
            yield b"x" * (64 << 10)

    r = server.client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    error_of(r, 413)


def test_api_key(live, sd15_pipe):
    s = live(ServeSettings(api_key="sekrit"), sd15_pipe)
    assert error_of(s.client.post("/v1/images/generations", json={"prompt": "x", "steps": 1}), 401)["code"] == \
        "invalid_api_key"
    ok = s.client.post("/v1/images/generations", json={"prompt": "x", "steps": 1},
                       headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200
    assert s.client.get("/health").status_code == 200  # operations stay open


def _wait(cond, timeout=60):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_cancellation_frees_rows_at_the_next_step(server):
    c = server.client
    jid = c.post("/v1/edits", json={"image": b64(png()), "target_prompt": "y", "method": "ddim", "steps": 400}).json()["id"]
    batcher = server.state.batcher
    _wait(lambda: batcher.loop.rows > 0)
    steps = batcher.steps
    assert c.delete(f"/v1/jobs/{jid}").status_code == 200
    _wait(lambda: batcher.loop.rows == 0)
    assert batcher.steps - steps <= 2  # gone at the next step boundary
    got = c.get(f"/v1/jobs/{jid}").json()
    assert got["status"] == "cancelled" and got["error"]["code"] == "cancelled"


def test_queue_full_is_429_with_retry_after(live, sd15_pipe):
    s = live(ServeSettings(max_queue=1, max_batch_rows=1), sd15_pipe)
    c = s.client
    long = {"image": b64(png()), "target_prompt": "y", "method": "ddim", "steps": 300}
    first = c.post("/v1/edits", json=long).json()["id"]
    _wait(lambda: s.state.batcher.loop.rows > 0)
    second = c.post("/v1/edits", json=long).json()["id"]  # waits: no room under max_batch_rows
    r = c.post("/v1/edits", json=long)
    assert error_of(r, 429)["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    for jid in (first, second):
        c.delete(f"/v1/jobs/{jid}")


def test_timeout_is_408(live, sd15_pipe):
    s = live(ServeSettings(timeout=0.3), sd15_pipe)
    r = s.client.post("/v1/images/generations", json={"prompt": "x", "steps": 500})
    assert error_of(r, 408)["code"] == "timeout"
    assert s.state.batcher.loop.rows == 0


def test_out_of_memory_hits_only_the_request_that_causes_it(server):
    batcher = server.state.batcher

    shared = []

    def inject(programs):  # the model "runs out of memory" whenever the poisoned request's rows are in a call
        for p in programs:
            job = batcher.programs[id(p)][0]
            if "POISON" in str(job.stages[-1].request.get("prompt")):
                shared.append(len(programs))
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    batcher.loop.before_call = inject
    results = {}

    def go(name, prompt):
        results[name] = server.client.post("/v1/images/generations", json={"prompt": prompt, "steps": 6})

    threads = [threading.Thread(target=go, args=(n, p)) for n, p in
               (("a", "a red circle"), ("bad", "POISON"), ("b", "a blue square"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"].status_code == 200 and results["b"].status_code == 200
    assert error_of(results["bad"], 503)["code"] == "out_of_memory"
    assert max(shared) > 1  # it failed a call it shared with the others, and only it failed
    assert 'overpaint_errors_total{reason="out_of_memory"} 1.0' in server.client.get("/metrics").text


def test_results_are_identical_alone_and_under_load_when_batch_invariant(live, sd15_pipe):
    s = live(ServeSettings(batch_invariant=True, bucket_rows=16, cache_bytes=0), sd15_pipe)  # every edit inverts
    form = edit_form(method="p2p", steps="3")
    calls = []
    s.state.batcher.loop.before_call = lambda programs: calls.append(len(programs))

    def edit(seed_img=0):
        r = s.client.post("/v1/images/edits", files={"image": ("a.png", png(seed=seed_img), "image/png")}, data=form)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["b64_json"]

    alone = edit()
    out = {}

    def load(i):
        out[i] = edit(seed_img=i)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out[0] == alone  # the same bytes while three other edits shared its model calls
    assert max(calls) > 1  # they did share calls


def test_rows_over_the_bucket_are_400_and_other_jobs_finish(live, sd15_pipe):
    s = live(ServeSettings(batch_invariant=True, bucket_rows=2), sd15_pipe)
    results = {}

    def go(name, body):
        results[name] = s.client.post("/v1/images/generations", json=body, timeout=60)

    threads = [threading.Thread(target=go, args=("ok", {"prompt": "x", "steps": 20})),
               threading.Thread(target=go, args=("big", {"prompt": "x", "steps": 2, "n": 3}))]  # 6 rows with CFG
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["ok"].status_code == 200
    assert error_of(results["big"], 400)["code"] == "too_many_rows"  # it used to hang, failing the others


def test_a_client_that_leaves_cancels_its_running_job(server):
    import httpx

    batcher = server.state.batcher
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", "steps": 900, "n": 4, "size": "96x96"},
                   timeout=1.5)
    job = max(batcher.jobs.values(), key=lambda j: j.order)
    _wait(lambda: job.finished, timeout=20)
    assert job.status == "cancelled"  # step events came faster than the old idle-only check ever saw
    assert batcher.loop.rows == 0
    assert len([e for e in job.events if e["type"] == "step"]) < 900


def test_one_failed_image_of_n_cancels_the_others(server):
    batcher = server.state.batcher
    first = []

    def inject(programs):  # a bug that hits the last job of the request only
        jobs = [batcher.programs[id(p)][0] for p in programs]
        if not first and len(jobs) == 3:
            first.append(max(jobs, key=lambda j: j.order))
        if first and first[0] in jobs:
            raise RuntimeError("injected")

    batcher.loop.before_call = inject
    r = server.client.post("/v1/images/edits", files={"image": ("a.png", png(), "image/png")},
                           data=edit_form(method="ddpm", steps="40", n="3"))
    assert error_of(r, 500)["code"] == "internal_error"
    jobs = [j for j in batcher.jobs.values() if j.route == "images/edits"]
    _wait(lambda: all(j.finished for j in jobs))
    assert sorted(j.status for j in jobs) == ["cancelled", "cancelled", "failed"]  # answered at once, none left
    assert batcher.loop.rows == 0


def test_which_edits_the_seed_changes(sd15_pipe):
    from engine.serving.requests import unseeded

    card = sd15_pipe.card
    assert unseeded({"method": "ddim"}, card) is not None  # DDIM inversion draws nothing
    assert unseeded({"method": "p2p", "inversion_method": "ddpm"}, card) is None
    assert unseeded({"method": "ddpm"}, card) is None
    assert "a given inversion is fixed" in unseeded({"method": "ddpm", "inversion": "inv_x"}, card)
    assert unseeded({"method": "imagic", "inversion": "inv_x"}, card) is None  # its generation reads the seed


def test_output_formats(server):
    c = server.client
    for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        r = c.post("/v1/images/generations", json={"prompt": "x", "steps": 1, "output_format": fmt,
                                                   "output_compression": 50})
        assert r.status_code == 200, r.text
        assert base64.b64decode(r.json()["data"][0]["b64_json"])[:len(magic)] == magic
    sizes = [len(c.post("/v1/images/generations", json={"prompt": "x", "steps": 1, "seed": 3, "output_format": "jpeg",
                                                        **q}).json()["data"][0]["b64_json"])
             for q in ({}, {"output_compression": 100}, {"output_compression": 10})]
    assert sizes[0] == sizes[1] > sizes[2]  # OpenAI's default quality is 100


def test_serve_refuses_an_open_host_without_a_key(capsys, monkeypatch):
    from engine.cli import main
    from engine.serving.server import check_host, is_loopback

    monkeypatch.delenv("OVERPAINT_API_KEY", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "set an API key" in capsys.readouterr().err
    check_host("0.0.0.0", "key", False)
    check_host("0.0.0.0", None, True)


def test_flux_model_over_http(live, flux_pipe):
    """A FLUX model served the same way: RF-Inversion and flow edits, a generation, their errors."""
    s = live(ServeSettings(max_body_bytes=2 << 20, max_pixels=512 * 512), flux_pipe)
    c = s.client
    r = c.post("/v1/images/edits", files={"image": ("a.png", png((16, 16)), "image/png")},
               data=edit_form(method="rf-inversion", gamma="0.3", eta="0.8", stop="0.5"))
    assert r.status_code == 200, r.text
    got = _finish(c, c.post("/v1/edits", json={"image": b64(png((16, 16))), "source_prompt": "a red circle",
                                               "target_prompt": "a blue circle", "steps": 2, "method": "flow"}))
    assert got["status"] == "succeeded", got
    r = c.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 2, "size": "16x16"})
    assert r.status_code == 200, r.text
    r = c.post("/v1/images/edits", files={"image": ("a.png", png((16, 16)), "image/png")},
               data=edit_form(method="p2p"))
    assert "runs on UNet" in error_of(r, 400)["message"]


def test_image_conditioned_inversion_over_http(live, server, tiny_sd15_dir, tmp_path):
    """``image_scale`` conditions the inversion on the uploaded image (Tight Inversion) through the
    IP-Adapter the server was started with; without one it is a clear 400."""
    import engine
    from engine.tiny import make_tiny_ip_adapter

    r = server.client.post("/v1/images/edits", files={"image": ("a.png", png(), "image/png")},
                           data=edit_form(image_scale="0.5"))
    assert "needs an IP-Adapter" in error_of(r, 400)["message"]
    file = make_tiny_ip_adapter(tmp_path, engine.load(tiny_sd15_dir).unet)
    s = live(ServeSettings(model=str(tiny_sd15_dir), ip_adapter=str(file)))
    for scale in ("0.5", "0"):
        r = s.client.post("/v1/images/edits", files={"image": ("a.png", png(), "image/png")},
                          data=edit_form(image_scale=scale))
        assert r.status_code == 200, r.text
