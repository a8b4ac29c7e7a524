"""Ray Serve: the same routes in front of several engine replicas (one per GPU, or machine).

Two deployments. ``Engine`` (``replicas`` of them, each holding a GPU) owns a model and its own
step-level :class:`~engine.serving.batcher.Batcher`; its ``run`` streams a job's events back.
``Ingress`` (one replica, no GPU) is the ordinary FastAPI app of :mod:`engine.serving.api`
whose batcher is a :class:`RemoteBatcher`: jobs, their events, the inversion cache and every
route live there, and each job's stages run on whichever engine replica Ray picks. A job's
stages (its inversion and its edit) run together on one replica, so inversions never cross
the network between them; a cached inversion is sent with the edit that reads it.

    overpaint serve --ray --replicas N [--device cuda]      (pip install 'overpaint[ray]')
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from .api import ServeSettings, create_app
from .jobs import ApiError, Job, Stage, forget_finished, queue_full, unavailable

log = logging.getLogger("overpaint.serving")
APP = "overpaint"


@dataclasses.dataclass
class ModelInfo:
    """What the ingress needs of the model without loading it."""

    name: str
    identity: str
    card: object
    default_size: int
    size_multiple: int

    def fit_size(self, height: int, width: int):
        from ..images import fit_size

        return fit_size(height, width, self.default_size, self.size_multiple)


class Engine:
    """One replica: a model and its batcher; ``run`` takes a job's stages and streams its events."""

    def __init__(self, settings: ServeSettings):
        from .api import Server

        self.server = Server(settings)
        self.batcher = self.server.local_batcher()
        pipe = self.server.pipe
        self._info = ModelInfo(pipe.name, pipe.identity, pipe.card, pipe.default_size, pipe.size_multiple)

    def info(self) -> ModelInfo:
        return self._info

    async def run(self, stages: list, output_type: str, timeout: float | None):
        results = []  # results of the stages before the last, for the ingress's on_result (the cache)
        job = Job([Stage(kind, request, on_result=results.append if i < len(stages) - 1 else None)
                   for i, (kind, request) in enumerate(stages)], timeout=timeout, output_type=output_type)
        queue = job.subscribe(asyncio.get_running_loop())
        try:
            self.batcher.submit(job)
        except ApiError as e:
            yield {"type": "error", "status": e.status, "headers": e.headers, **e.body()}
            return
        try:
            while True:
                event = await queue.get()
                while results:
                    yield {"type": "result", "result": portable(results.pop(0))}
                if event["type"] == "done":
                    yield {"type": "done", "result": portable(job.result)}
                    return
                if event["type"] == "error":
                    yield {**event, "headers": job.error.headers if job.error is not None else {}}
                    return
                if event["type"] != "queued":  # the ingress reported the job queued
                    yield event
        finally:
            if not job.finished:  # the ingress cancelled the stream
                self.batcher.cancel(job.id)
            job.unsubscribe(queue)
            self.batcher.jobs.pop(job.id, None)  # the ingress keeps the job, not this replica


def portable(result):
    """A result the ingress (no GPU) can unpickle: inversions and tensors on the CPU."""
    if isinstance(result, list):
        return [portable(r) for r in result]
    if hasattr(result, "to") and (hasattr(result, "extras") or hasattr(result, "is_cuda")):  # an Inversion, a tensor
        return result.to("cpu")
    return result


class RemoteBatcher:
    """The ingress's batcher: keeps the jobs, runs each on an engine replica through a streaming
    handle, and turns the stream back into the job's events. Same interface as Batcher."""

    rows = 0  # the replicas batch; their own /metrics would show rows

    def __init__(self, handle, loop, max_queue: int, metrics=None):
        self.handle, self.loop, self.max_queue, self.metrics = handle, loop, max_queue, metrics
        self.jobs: dict[str, Job] = {}
        self.tasks: dict[str, asyncio.Future] = {}
        self.accepting = True

    @property
    def depth(self) -> int:
        return sum(1 for j in self.jobs.values() if j.status == "queued")

    def submit(self, job: Job) -> Job:
        if not self.accepting:
            raise unavailable("the server is shutting down; retry later", "draining")
        if len(self.tasks) >= self.max_queue:
            raise queue_full(retry_after=1)
        self.jobs[job.id] = job
        forget_finished(self.jobs)
        job.emit({"type": "queued", "job": job.id, "position": len(self.tasks)})
        self.tasks[job.id] = asyncio.run_coroutine_threadsafe(self._run(job), self.loop)
        return job

    async def _run(self, job: Job) -> None:
        spec = [(st.kind, st.request) for st in job.stages]
        stage, stream = 0, None
        try:
            stream = self.handle.options(stream=True).run.remote(spec, job.output_type, job.timeout)
            async for event in stream:
                kind = event["type"]
                if kind == "result":
                    if job.stages[stage].on_result is not None:
                        job.stages[stage].on_result(event["result"])
                    stage += 1
                elif kind == "done":
                    last = job.stages[-1].on_result
                    if last is not None:
                        last(event["result"])
                    job.succeed(event["result"])
                    if self.metrics is not None:
                        self.metrics.done(job)
                elif kind == "error":
                    err = event["error"]
                    job.fail(ApiError(event["status"], err["message"], err["type"], err["param"], err["code"],
                                      event.get("headers")))
                else:
                    if kind in ("stage", "step"):
                        job.status = "running"
                    job.emit({**event, "job": job.id})  # the client's id, not the replica's
        except asyncio.CancelledError:
            if stream is not None:
                stream.cancel()  # the replica's generator stops and its batcher drops the job's rows
            job.fail(ApiError(499, "cancelled by the client", "invalid_request_error", None, "cancelled"))
        except Exception as e:  # noqa: BLE001 -- a replica died or refused: this job fails, the server goes on
            log.warning("engine replica failed a job: %s", e)
            job.fail(unavailable(f"an engine replica failed ({type(e).__name__}); retry", "replica_error"))
        finally:
            self.tasks.pop(job.id, None)
            job.release()

    def cancel(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", "invalid_request_error", "id", "not_found")
        job.cancelled = True
        task = self.tasks.get(job_id)
        if task is not None:
            task.cancel()
        return job

    def hurry(self) -> None:
        """The replicas drain themselves; nothing to cut short here."""

    def drain(self, grace_s: float) -> None:
        self.accepting = False
        end = time.monotonic() + grace_s
        while self.tasks and time.monotonic() < end:
            time.sleep(0.05)
        for job in list(self.jobs.values()):
            job.fail(unavailable("the server shut down before this job finished", "shutdown"))


def application(settings: ServeSettings, replicas: int = 1):
    """The Ray Serve application: Ingress -> Engine x replicas."""
    from ray import serve

    gpu = settings.device.startswith("cuda")
    engine_dep = serve.deployment(Engine, name="Engine", num_replicas=replicas,
                                  ray_actor_options={"num_gpus": 1} if gpu else {"num_cpus": 1},
                                  max_ongoing_requests=max(8, settings.max_queue))

    def build():
        def connect(server):
            handle = serve.get_deployment_handle("Engine", app_name=APP)
            info = handle.info.remote().result()
            return info, RemoteBatcher(handle, server.loop, settings.max_queue, server.metrics)

        return create_app(settings, connect=connect)

    ingress = serve.deployment(serve.ingress(build)(), name="Ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=settings.max_queue * 4 + 64)
    return ingress.bind(engine_dep.bind(settings))


def deploy(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1) -> str:
    """Start Serve's HTTP proxy on host:port and deploy the application; returns its URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(application(settings, replicas), name=APP, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def serve_ray(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1) -> None:
    """``overpaint serve --ray``: deploy, then wait for SIGTERM / Ctrl-C and shut Serve down."""
    import signal
    import threading

    import ray
    from ray import serve

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    url = deploy(settings, host, port, replicas)
    print(f"overpaint: serving {settings.model} through Ray Serve on {url} ({replicas} engine replica(s))", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
