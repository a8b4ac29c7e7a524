"""The HTTP API: OpenAI-compatible image routes, native job routes with server-sent events,
the inversion cache, health, readiness, metrics and the web page.

    create_app(settings, pipe=None) -> FastAPI  (the model loads in the background unless given)

Every error is OpenAI-shaped ({"error": {message, type, param, code}}) with its HTTP status.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .batcher import Batcher
from .cache import InversionCache
from .jobs import ApiError, Job, bad_request
from .limits import BodyTooLarge, Guard
from .metrics import Metrics
from .requests import (INVERT_FIELDS, b64_image, edit_job, generation_job, integer, inversion_stage, method_params,
                       openai_options, size, text, unseeded)

PAGE = Path(__file__).with_name("page.html")


@dataclass
class ServeSettings:
    model: str = "shapes"
    device: str = "cpu"
    dtype: str = "fp32"
    cuda_graphs: bool = False
    max_batch_rows: int = 64
    max_queue: int = 256
    max_body_bytes: int = 32 << 20
    max_pixels: int = 4096 * 4096
    timeout: float = 600.0
    cache_bytes: int = 2 << 30
    cache_dir: str | None = None
    api_key: str | None = None
    batch_invariant: bool = False
    bucket_rows: int | None = None
    grace_s: float = 30.0
    # An IP-Adapter for image-conditioned inversions (the ``image_scale`` field): a file, or "own" for
    # the one the model ships (the bundled Shapes model's); None: none (rows carry no image fields).
    ip_adapter: str | None = None
    image_encoder: str | None = None


class Server:
    """What the routes share: settings, the model (``model``: a Pipeline, or on a Ray ingress its
    :class:`ModelInfo`), the batcher (local, or :class:`engine.serving.ray_app.RemoteBatcher`),
    the cache and the metrics."""

    def __init__(self, settings: ServeSettings, pipe=None, connect=None):
        self.settings, self.pipe, self.batcher = settings, pipe, None
        self.model = pipe  # what requests read: name, identity, card, fit_size
        self.connect = connect  # callable(server) -> (model info, batcher): a remote engine instead of a local one
        self.cache = InversionCache(settings.cache_bytes, settings.cache_dir)
        self.metrics = Metrics()
        self.ready = self.draining = self.stopped = False
        self.load_error: str | None = None
        self._stop_lock = threading.Lock()

    def start(self) -> None:
        """Load the model (unless given) and start the engine thread, in the background."""
        def load():
            try:
                if self.connect is not None:
                    self.model, self.batcher = self.connect(self)
                else:
                    self.batcher = self.local_batcher()
                self.ready = True
            except Exception as e:  # noqa: BLE001 -- reported by /ready and /health
                self.load_error = f"{type(e).__name__}: {e}"

        threading.Thread(target=load, name="overpaint-load", daemon=True).start()

    def local_batcher(self) -> Batcher:
        if self.pipe is None:
            import engine

            self.pipe = engine.load(self.settings.model, device=self.settings.device, dtype=self.settings.dtype)
            s = self.settings
            if s.ip_adapter:
                self.pipe.load_ip_adapter(None if s.ip_adapter == "own" else s.ip_adapter, image_encoder=s.image_encoder)
        self.model = self.pipe
        kw = {"batch_invariant": self.settings.batch_invariant}
        if self.settings.bucket_rows:
            kw["bucket_rows"] = self.settings.bucket_rows
        return Batcher(self.pipe, max_rows=self.settings.max_batch_rows, max_queue=self.settings.max_queue,
                       cuda_graphs=self.settings.cuda_graphs, metrics=self.metrics, **kw).start()

    def begin_drain(self) -> None:
        self.draining, self.ready = True, False
        if self.batcher is not None:
            self.batcher.accepting = False

    def stop(self) -> None:
        """Drain (once; later calls wait for it): see :meth:`Batcher.drain`."""
        self.begin_drain()
        with self._stop_lock:
            if self.batcher is not None and not self.stopped:
                self.batcher.drain(self.settings.grace_s)
                self.stopped = True


FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # OpenAI's output_format -> PIL's


def image_b64(image, size_hw=None, output_format: str = "png", quality: int | None = None) -> str:
    """An image as base64 (PNG unless ``output_format`` says "jpeg" or "webp", at ``quality``)."""
    if size_hw is not None and image.size != (size_hw[1], size_hw[0]):
        from PIL import Image

        image = image.resize((size_hw[1], size_hw[0]), Image.BICUBIC)
    buf = io.BytesIO()
    kw = {} if quality is None or output_format == "png" else {"quality": quality}
    image.save(buf, format=FORMATS[output_format], **kw)
    return base64.b64encode(buf.getvalue()).decode()


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(settings: ServeSettings | None = None, pipe=None, connect=None) -> FastAPI:
    """The app; ``pipe``: a loaded Pipeline to serve (else ``settings.model`` loads in the
    background); ``connect``: see :class:`Server` (Ray Serve's ingress)."""
    settings = settings or ServeSettings()
    server = Server(settings, pipe, connect)
    app = FastAPI(title="overpaint", version=_version(), docs_url="/docs", redoc_url=None,
                  lifespan=_lifespan(server))
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        if not e.counted:  # a job's error was counted when the job ended
            server.metrics.error(None, e)
        return error_response(e)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, e):
        return error_response(ApiError(413, f"request body over the {settings.max_body_bytes}-byte limit",
                                       "invalid_request_error", None, "body_too_large"))

    # ---- bodies ---------------------------------------------------------------------------
    async def json_body(request: Request) -> dict:
        raw = await request.body()
        try:
            data = json.loads(raw or b"null")
        except ValueError as e:
            raise bad_request(f"the body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(data, dict):
            raise bad_request("the body must be a JSON object", None, "invalid_json")
        return data

    async def form_body(request: Request) -> tuple[dict, bytes | None]:
        kind = request.headers.get("content-type", "")
        if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise bad_request("this route takes multipart/form-data (fields and an 'image' file)", None,
                              "invalid_content_type")
        try:
            form = await request.form(max_files=4, max_fields=200)
        except BodyTooLarge:
            raise
        except Exception as e:  # noqa: BLE001 -- any malformed multipart body
            raise bad_request(f"malformed multipart body ({e})", None, "invalid_multipart") from None
        fields, image = {}, None
        for k, v in form.multi_items():
            if hasattr(v, "read"):
                if k not in ("image", "image[]"):
                    raise bad_request(f"unexpected file field '{k}'; send the image as 'image'", k)
                if image is not None:
                    raise bad_request("one image per edit; overpaint does not combine several", "image")
                image = await v.read()
            else:
                fields[k] = v
        return fields, image

    # ---- waiting for jobs -----------------------------------------------------------------
    async def finished(job: Job, request: Request) -> Job:
        """Wait for the job's terminal event. A client that disconnects cancels it (checked at
        least every half second, events or not) and gets a 499 nobody reads."""
        loop = asyncio.get_running_loop()
        queue = job.subscribe(loop)
        next_check = loop.time() + 0.5
        try:
            while not job.finished:
                try:
                    await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                if loop.time() >= next_check and not job.finished:
                    next_check = loop.time() + 0.5
                    if await request.is_disconnected():
                        server.batcher.cancel(job.id)
                        gone = ApiError(499, "the client disconnected", "invalid_request_error", None, "cancelled")
                        gone.counted = True  # the job's own cancellation is counted
                        raise gone
        finally:
            job.unsubscribe(queue)
        return job

    def submit(job: Job) -> Job:
        return server.batcher.submit(job)

    def images(job: Job, size_hw=None, output_format: str = "png", quality: int | None = None) -> list[dict]:
        if job.error is not None:
            raise job.error
        return [{"b64_json": image_b64(im, size_hw, output_format, quality)} for im in job.result]

    async def run_jobs(make, n: int, request: Request, out_size=None, fmt=("png", None)) -> dict:
        """Submit ``n`` jobs (``make(i)``), wait for all, answer with their images; if one fails
        or the client leaves, the others are cancelled, never left running."""
        jobs, waits = [], []
        try:
            for i in range(n):  # building a job decodes its image: off the event loop
                jobs.append(submit(await asyncio.to_thread(make, i)))
            waits = [asyncio.ensure_future(finished(job, request)) for job in jobs]
            for done in asyncio.as_completed(waits):  # the first failure, whichever image it is, ends the request
                job = await done
                if job.error is not None:
                    raise job.error
            data = []
            for job in jobs:
                data += await asyncio.to_thread(images, job, out_size, *fmt)
            return {"created": int(time.time()), "data": data}
        finally:
            for w in waits:
                w.cancel()
            for job in jobs:
                if not job.finished:
                    server.batcher.cancel(job.id)

    # ---- OpenAI-compatible routes ---------------------------------------------------------
    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        fields, image = await form_body(request)
        fmt = openai_options(fields, "edits")
        n = integer(fields, "n", 1, 1, 8)
        out_size = size(fields)
        seed = integer(fields, "seed", 0, -(2**127), 2**127)  # the engine reduces seeds beyond 64 bits
        why = unseeded(fields, server.model.card) if n > 1 else None
        if why is not None:
            raise bad_request(f"n={n} asks for variations, but every image would be the same: {why}; or send n=1",
                              "n")
        if image is not None:
            image = bytes(image)
        return await run_jobs(lambda i: edit_job(server, dict(fields, seed=str(seed + i)), image, "images/edits"),
                              n, request, out_size, fmt)

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        fields = await json_body(request)
        fmt = openai_options(fields, "generations")
        return await run_jobs(lambda i: generation_job(server, fields), 1, request, None, fmt)

    # ---- native routes --------------------------------------------------------------------
    @app.post("/v1/inversions")
    async def inversions(request: Request):
        fields = await json_body(request)
        image = b64_image(fields)
        method = text(fields, "method", default="ddim")
        if method not in ("ddim", "ddpm", "ledits++"):
            raise bad_request(f"unknown inversion method {method!r}; use ddim, ddpm or ledits++", "method")
        params, edit_only = method_params(fields, method, {"image", "source_prompt", "method"})
        if edit_only:  # an edit's parameter sent to an inversion
            k = sorted(edit_only)[0]
            raise bad_request(f"'{k}' is an edit parameter; an inversion takes "
                              f"{', '.join(sorted(INVERT_FIELDS))}", k, "unknown_parameter")
        source = text(fields, "source_prompt", default="")
        key, inv, stage = await asyncio.to_thread(inversion_stage, server, image, source, method, params)
        if inv is None:
            job = submit(Job([stage], route="inversions", method=method, timeout=settings.timeout))
            try:
                await finished(job, request)
            finally:
                if not job.finished:
                    server.batcher.cancel(job.id)
            if job.error is not None:
                raise job.error
            inv, job.result, job.result_bytes = job.result, None, 0  # the cache holds it, not the job table
        return {"id": key, "object": "inversion", "cached": stage is None, "method": inv.method, "steps": inv.steps}

    @app.post("/v1/edits", status_code=202)
    async def edits(request: Request):
        fields = await json_body(request)
        image = b64_image(fields) if "image" in fields else None
        params = fields.pop("parameters", {})
        if not isinstance(params, dict):
            raise bad_request("'parameters' must be an object", "parameters")
        job = submit(await asyncio.to_thread(edit_job, server, {**fields, **params}, image, "edits"))
        return JSONResponse(job.summary(), status_code=202)

    def job_of(job_id: str) -> Job:
        job = server.batcher.jobs.get(job_id) if server.batcher else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", "invalid_request_error", "id", "not_found")
        return job

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        job = job_of(job_id)
        out = job.summary()
        if job.status == "succeeded" and isinstance(job.result, list):  # images (an inversion job has none)
            out["data"] = await asyncio.to_thread(images, job)
        return out

    @app.delete("/v1/jobs/{job_id}")
    async def delete_job(job_id: str):
        job = job_of(job_id)
        if not job.finished:
            server.batcher.cancel(job_id)
        return {"id": job_id, "object": "job", "deleted": True, "status": job.status}

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        job = job_of(job_id)

        async def stream():
            queue = job.subscribe(asyncio.get_running_loop())
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=15)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        yield ": keep-alive\n\n"
                        continue
                    if event["type"] == "done" and isinstance(job.result, list):
                        event = {**event, "data": await asyncio.to_thread(images, job)}
                    yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                    if event["type"] in ("done", "error"):
                        return
            finally:
                job.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- operations -----------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if server.load_error:
            return JSONResponse({"status": "error", "error": server.load_error}, status_code=500)
        return {"status": "ok", "ready": server.ready, "draining": server.draining}

    @app.get("/ready")
    async def ready():
        if not server.ready:
            why = "draining" if server.draining else "failed" if server.load_error else "loading"
            return JSONResponse({"status": why, "error": server.load_error}, status_code=503)
        return {"status": "ready", "model": server.model.name, "queue": server.batcher.depth}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(server.batcher), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text()

    app.add_middleware(Guard, state=server, max_bytes=settings.max_body_bytes, api_key=settings.api_key)
    return app


def _lifespan(server: Server):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.loop = asyncio.get_running_loop()  # where a remote batcher runs its streams
        server.start()
        yield
        await asyncio.to_thread(server.stop)

    return lifespan


def _version() -> str:
    from engine import __version__

    return __version__
