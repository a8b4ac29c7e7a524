"""A served request: a job of one or more stages (invert, then edit; or generate), its events,
and the errors it can end with, shaped as OpenAI's API shapes them."""

from __future__ import annotations

import enum
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

class _Marker(enum.Enum):
    PREVIOUS = "previous"  # an enum member: the same object after pickling (to a Ray replica and back)


PREVIOUS = _Marker.PREVIOUS  # in a stage's request: the previous stage's result (an edit's inversion)


class ApiError(Exception):
    """An error a client gets: HTTP status and OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.counted = False  # in the metrics already

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def queue_full(retry_after: int) -> ApiError:
    return ApiError(429, "the server's queue is full; retry later", "rate_limit_error", None, "queue_full",
                    {"Retry-After": str(retry_after)})


def unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, "server_error", None, code, {"Retry-After": "5"})


def timed_out(seconds: float) -> ApiError:
    return ApiError(408, f"the request did not finish within the server's {seconds:g} s timeout", "timeout_error",
                    None, "timeout")


@dataclass(eq=False)
class Stage:
    """One program of a job: ``kind`` "invert" | "edit" | "generate" and the request
    (``Pipeline.program``'s); ``on_result`` sees the finished result (e.g. caching an inversion)."""

    kind: str
    request: dict
    on_result: Callable[[Any], None] | None = None


_ids = itertools.count()


@dataclass(eq=False)  # identity: jobs are compared and removed by object, never by value
class Job:
    """A request in the server: stages run one after another through the batcher; every job ends
    with exactly one terminal event, ``done`` (with ``result``) or ``error`` (with ``error``)."""

    stages: list[Stage]
    route: str = "edit"
    method: str = "-"
    timeout: float | None = None
    output_type: str = "pil"
    id: str = field(default_factory=lambda: f"job_{uuid.uuid4().hex[:20]}")
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued -> running -> succeeded | failed | cancelled
    stage: int = 0
    result: Any = None
    error: ApiError | None = None
    events: list[dict] = field(default_factory=list)
    cancelled: bool = False
    pending: Any = None  # the next stage's program, built while it waits for room
    stage_steps: int = 0  # steps of the running stage's program
    order: int = field(default_factory=lambda: next(_ids))
    result_bytes: int = 0  # what the finished result holds in memory (the job table's bound counts it)
    ended: int = -1  # when it finished, in the order jobs finish

    def __post_init__(self):
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._subscribers: list = []  # (asyncio loop, asyncio.Queue)
        self.started = time.monotonic()
        self.deadline = None if self.timeout is None else self.started + self.timeout

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def emit(self, event: dict) -> None:
        """Record an event and hand it to every subscriber (thread-safe)."""
        self._emit(event)

    def _emit(self, event: dict, **attrs) -> bool:
        """Append ``event`` (and set ``attrs``) unless a terminal event came first; atomic, so a
        job that failed on one thread cannot be marked succeeded by another."""
        with self._lock:
            if self._done.is_set():
                return False  # nothing follows a terminal event
            for k, v in attrs.items():
                setattr(self, k, v)
            self.events.append(event)
            if event["type"] in ("done", "error"):
                self.ended = next(_ids)  # the order jobs finished in (the job table forgets the oldest first)
                self._done.set()
            subs = list(self._subscribers)
        for loop, queue in subs:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # that client's event loop is gone
                pass
        return True

    def succeed(self, result) -> None:
        self._emit({"type": "done", "job": self.id}, result=result, status="succeeded",
                   result_bytes=held_bytes(result))

    def fail(self, error: ApiError) -> None:
        self._emit({"type": "error", "job": self.id, "status": error.status, **error.body()}, error=error,
                   status="cancelled" if error.code == "cancelled" else "failed")

    def release(self) -> None:
        """After the job ends: drop what only its stages needed (images, cached inversions, a
        program waiting for room, an earlier stage's result); a succeeded job's result stays
        for clients that fetch it."""
        self.pending = None
        for st in self.stages:
            st.request = {}
        if self.status != "succeeded":  # e.g. the inversion of a job cancelled before its edit ran
            self.result = None

    def subscribe(self, loop):
        """An asyncio.Queue of this job's events, past ones first (call from ``loop``)."""
        import asyncio

        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            for e in self.events:
                queue.put_nowait(e)
            if not self._done.is_set():
                self._subscribers.append((loop, queue))
        return queue

    def unsubscribe(self, queue) -> None:
        with self._lock:
            self._subscribers = [(lp, q) for lp, q in self._subscribers if q is not queue]

    def summary(self) -> dict:
        steps = [e for e in self.events if e["type"] == "step"]
        out = {"id": self.id, "object": "job", "status": self.status, "created": int(self.created),
               "route": self.route, "method": self.method}
        if steps:
            out["progress"] = {k: steps[-1][k] for k in ("stage", "step", "steps")}
        if self.error is not None:
            out["error"] = self.error.body()["error"]
        return out


def held_bytes(result) -> int:
    """Bytes a job's result holds: images (PIL), tensors or arrays, an inversion, or a list of them."""
    n = 0
    for r in result if isinstance(result, (list, tuple)) else [result]:
        if hasattr(r, "getbands"):  # a PIL image
            n += r.width * r.height * len(r.getbands())
        elif isinstance(getattr(r, "nbytes", None), int):  # a tensor or an array
            n += r.nbytes
        elif hasattr(r, "x0") and hasattr(r, "extras"):  # an Inversion
            from .cache import nbytes

            n += nbytes(r)
    return n


def forget_finished(jobs: dict, keep: int = 4096, max_bytes: int = 1 << 30) -> None:
    """Bound a job table: finished jobs beyond ``keep`` jobs, or whose results add up past
    ``max_bytes``, are forgotten, the earliest finished first (running and queued jobs stay)."""
    done = sorted((j for j in jobs.values() if j.finished), key=lambda j: j.ended)
    excess, total = len(jobs) - keep, sum(j.result_bytes for j in done)
    for j in done:
        if excess <= 0 and total <= max_bytes:
            return
        del jobs[j.id]
        excess, total = excess - 1, total - j.result_bytes
