"""The engine thread: step-level continuous batching of every request's programs.

One thread owns the model. Jobs wait in a FIFO queue; between denoising steps the batcher
admits jobs whose rows fit under ``max_rows`` (the head of the queue waits for room, so
nobody is overtaken), builds their programs and lets them join :class:`engine.step.Loop`,
whose one call per step serves every live program of every client: inversions and edits
alike. A finished program hands its result to the job's next stage (an edit after its
inversion) or finishes the job. At each step boundary cancelled and timed-out jobs leave.

A failed model call (a device out-of-memory error, or any exception) does not take the batch
down: the programs that had not advanced are retried one by one, memory is freed, and only
those that fail alone end with an error (503 for out-of-memory, 500 otherwise).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import torch

from ..runtime import is_oom
from ..step import Loop
from .jobs import PREVIOUS, ApiError, Job, bad_request, forget_finished, queue_full, timed_out, unavailable

log = logging.getLogger("overpaint.serving")


class Batcher:
    """Runs jobs on ``pipe`` in a background thread (:meth:`start`); :meth:`submit` from any thread.

    max_rows: cap on live model rows per step (None: no cap). max_queue: jobs waiting beyond it
    are refused with 429. keep_bytes: finished jobs' results kept (oldest forgotten first; at most
    4096 jobs). ``loop_kw``: :class:`Loop` options (batch_invariant, bucket_rows).
    ``metrics``: an :class:`engine.serving.metrics.Metrics` (optional)."""

    def __init__(self, pipe, *, max_rows: int | None = 64, max_queue: int = 256, cuda_graphs: bool = False,
                 metrics=None, keep_bytes: int = 1 << 30, **loop_kw):
        self.pipe = pipe
        runner = pipe.graphs if cuda_graphs else None
        self.loop = Loop(pipe.denoiser.with_runner(runner), **loop_kw)
        self.max_rows, self.max_queue, self.metrics = max_rows, max_queue, metrics
        self.keep_bytes = keep_bytes  # finished jobs' results kept for clients that fetch them later
        self.queue: collections.deque[Job] = collections.deque()
        self.programs: dict[int, tuple[Job, object]] = {}  # id(program) -> (job, program) for live ones
        self.ready: list[Job] = []  # jobs between stages, waiting for room
        self.cond = threading.Condition()
        self.accepting, self.stopping = True, False
        self.jobs: dict[str, Job] = {}
        self._thread: threading.Thread | None = None
        self._hurry = threading.Event()  # set: a drain stops waiting for running jobs
        self.steps = 0

    # ---- any thread -------------------------------------------------------------------
    def start(self) -> "Batcher":
        self._thread = threading.Thread(target=self._run, name="overpaint-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        with self.cond:
            if not self.accepting:
                raise unavailable("the server is shutting down; retry on another replica", "draining")
            if len(self.queue) >= self.max_queue:
                raise queue_full(retry_after=max(1, len(self.queue) // 4))
            self.queue.append(job)
            self.jobs[job.id] = job
            forget_finished(self.jobs, max_bytes=self.keep_bytes)
            job.emit({"type": "queued", "job": job.id, "position": len(self.queue)})
            self.cond.notify()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", "invalid_request_error", "id", "not_found")
        job.cancelled = True  # the engine removes its rows at the next step boundary
        with self.cond:
            self.cond.notify()
        return job

    @property
    def depth(self) -> int:
        return len(self.queue)

    @property
    def rows(self) -> int:
        return self.loop.rows

    def drain(self, grace_s: float) -> None:
        """Stop accepting; let queued and running jobs finish within ``grace_s``; end the rest with
        a 503 error (every accepted job gets a terminal event); stop the thread."""
        with self.cond:
            self.accepting = False
            self.cond.notify()
        end = time.monotonic() + grace_s
        while time.monotonic() < end and (self.queue or self.programs or self.ready) and not self._hurry.is_set():
            time.sleep(0.02)
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for job in list(self.jobs.values()):
            job.fail(unavailable("the server shut down before this job finished", "shutdown"))

    def hurry(self) -> None:
        """Cut a drain's grace period short (a second SIGTERM): what is left ends with 503 now."""
        self._hurry.set()

    # ---- the engine thread ------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.queue or self.ready or self.programs or self.stopping):
                    self.cond.wait(0.5)
                    self._boundary()
                if self.stopping:
                    return
            try:
                self._boundary()
                self._admit()
                if self.programs:
                    self._step()
            except Exception as e:  # noqa: BLE001 -- a bug must not stop the engine: fail what ran, go on
                error = self._internal(e)
                for job in self._active():  # each its own error: the metrics count every job
                    self._end(job, ApiError(error.status, error.message, error.type, error.param, error.code))

    def _boundary(self) -> None:
        """Cancelled and timed-out jobs leave: their programs are removed before the next step."""
        now = time.monotonic()
        for job in self._active():
            if job.cancelled:
                self._end(job, ApiError(499, "cancelled by the client", "invalid_request_error", None, "cancelled"))
            elif job.deadline is not None and now > job.deadline:
                self._end(job, timed_out(job.timeout))

    def _active(self) -> list[Job]:
        live = {id(j): j for j, _ in self.programs.values()}
        for j in list(self.queue) + self.ready:
            live.setdefault(id(j), j)
        return list(live.values())

    def _end(self, job: Job, error: ApiError) -> None:
        for key, (j, prog) in list(self.programs.items()):
            if j is job:
                self.loop.remove(prog)
                del self.programs[key]
        with self.cond:
            if job in self.queue:
                self.queue.remove(job)
        if job in self.ready:
            self.ready.remove(job)
        job.fail(error)
        job.release()
        if self.metrics is not None and not error.counted:
            self.metrics.error(job, error)
            error.counted = True

    def _admit(self) -> None:
        """FIFO: jobs between stages first, then the queue, while their rows fit under max_rows."""
        while True:
            with self.cond:
                job = self.ready[0] if self.ready else self.queue[0] if self.queue else None
            if job is None:
                return
            stage = job.stages[job.stage]
            request = {k: (job.result if v is PREVIOUS else v) for k, v in stage.request.items()}
            try:
                if job.pending is None:  # built once, kept while the job waits for room
                    with torch.no_grad():
                        job.pending = self.pipe.program(stage.kind, request)
                prog = job.pending
            except (ValueError, TypeError) as e:
                self._pop(job)
                self._end(job, bad_request(str(e), _param_of(str(e))))
                continue
            except Exception as e:  # noqa: BLE001 -- one bad request must not stop the server
                self._pop(job)
                self._free()
                self._end(job, self._failure(e))
                continue
            rows = prog.model_rows()
            if self.loop.max_rows is not None and rows > self.loop.max_rows:  # would never fit a batch
                self._pop(job)
                self._end(job, bad_request(f"this request needs {rows} model rows per step and the server's "
                                           f"batches hold {self.loop.max_rows} (--bucket-rows); send fewer "
                                           f"images or edit prompts", None, "too_many_rows"))
                continue
            if self.programs and self.max_rows is not None and self.loop.rows + rows > self.max_rows:
                return  # wait for room; the head keeps its place (its program is rebuilt then)
            self._pop(job)
            job.status, job.result, job.pending = "running", None, None
            try:
                self.loop.add(prog)
            except ValueError as e:
                self._end(job, bad_request(str(e), None))
                continue
            self.programs[id(prog)] = (job, prog)
            job.stage_steps = prog.steps_left
            job.emit({"type": "stage", "job": job.id, "stage": stage.kind, "steps": prog.steps_left})

    def _pop(self, job: Job) -> None:
        with self.cond:
            if self.ready and self.ready[0] is job:
                self.ready.pop(0)
            elif self.queue and self.queue[0] is job:
                self.queue.popleft()

    def _step(self) -> None:
        live = list(self.programs.values())
        before = {id(p): p.steps_left for _, p in live}
        tic = time.perf_counter()
        rows = self.loop.rows
        try:
            with torch.no_grad():
                self.loop.step()
        except Exception as e:  # noqa: BLE001
            log.warning("a model call failed (%s); retrying its programs one by one", type(e).__name__)
            self._free()
            for job, prog in live:
                if prog.steps_left != before[id(prog)] or id(prog) not in self.programs:
                    continue
                try:
                    with torch.no_grad():
                        self.loop.step([prog])
                except Exception as e2:  # noqa: BLE001
                    self._free()
                    self._end(job, self._failure(e2))
        self.steps += 1
        if self.metrics is not None:
            self.metrics.step(rows, time.perf_counter() - tic, self.pipe.device)
        for key, (job, prog) in list(self.programs.items()):
            stage = job.stages[job.stage]
            n = job.stage_steps
            job.emit({"type": "step", "job": job.id, "stage": stage.kind, "step": n - prog.steps_left, "steps": n})
            if prog.done:
                del self.programs[key]
                self._finish_stage(job, stage, prog)

    def _finish_stage(self, job: Job, stage, prog) -> None:
        try:
            with torch.no_grad():
                result = self.pipe.finish(stage.kind, prog.result(), job.output_type, prog.matte,
                                          getattr(prog, "image_prompt", None))
            if stage.on_result is not None:
                stage.on_result(result)
        except Exception as e:  # noqa: BLE001
            self._free()
            self._end(job, self._failure(e))
            return
        job.result = result
        job.stage += 1
        if job.stage < len(job.stages):
            self.ready.append(job)
        else:
            job.succeed(result)
            job.release()
            if self.metrics is not None:
                self.metrics.done(job)

    def _free(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _failure(self, e: BaseException) -> ApiError:
        """What a job that failed alone gets: 503 when the device ran out of memory, else 500."""
        if is_oom(e):
            return unavailable("the device ran out of memory for this request; retry with a smaller image or "
                               "fewer images", "out_of_memory")
        return self._internal(e)

    @staticmethod
    def _internal(e: BaseException) -> ApiError:
        log.exception("request failed", exc_info=e)
        return ApiError(500, f"internal error ({type(e).__name__}); the server keeps serving", "server_error",
                        None, "internal_error")


def _param_of(message: str) -> str | None:
    """The argument an engine error names first ("steps must be an integer ..." -> "steps")."""
    head = message.split(" ", 1)[0].strip("'\"`:,")
    return head if head.isidentifier() and head not in ("a", "an", "the", "this", "cannot", "unknown") else None
