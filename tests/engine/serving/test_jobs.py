"""Jobs on their own: one terminal event, whichever comes first, and a bounded job table."""

import torch
from PIL import Image

from engine.serving.jobs import Job, Stage, forget_finished, held_bytes, unavailable


def test_a_failed_job_is_never_marked_succeeded():
    job = Job([Stage("generate", {"prompt": "x"})])
    job.fail(unavailable("the server shut down before this job finished", "shutdown"))
    job.succeed(["late result"])  # the engine thread finishing after drain gave up on it
    assert job.status == "failed" and job.result is None
    assert [e["type"] for e in job.events] == ["error"]


def test_release_drops_what_only_the_stages_needed():
    image = torch.zeros(1, 3, 8, 8)
    job = Job([Stage("invert", {"image": image}), Stage("edit", {"inv": object()})])
    job.pending = object()
    job.succeed([Image.new("RGB", (4, 4))])
    job.release()
    assert job.pending is None and all(st.request == {} for st in job.stages)
    assert job.result is not None  # kept for clients that fetch it
    cancelled = Job([Stage("invert", {"image": image}), Stage("edit", {})])
    cancelled.result = "the first stage's inversion"
    cancelled.fail(unavailable("the server shut down before this job finished", "shutdown"))
    cancelled.release()
    assert cancelled.result is None  # a failed job keeps nothing


def test_held_bytes_counts_images_tensors_and_lists():
    assert held_bytes([Image.new("RGB", (10, 20)), Image.new("RGBA", (2, 2))]) == 600 + 16
    assert held_bytes(torch.zeros(3, 5, dtype=torch.float16)) == 30
    assert held_bytes(None) == 0


def test_forget_finished_bounds_jobs_and_bytes_oldest_first():
    def done(n_bytes):
        job = Job([Stage("generate", {})])
        job.succeed(torch.zeros(n_bytes, dtype=torch.uint8))
        return job

    running, late = Job([Stage("generate", {})]), Job([Stage("generate", {})])
    jobs = {j.id: j for j in [late, done(10), done(10), running, done(10), done(10)]}
    late.succeed(torch.zeros(10, dtype=torch.uint8))  # created first, finished last
    order = list(jobs)
    forget_finished(jobs, keep=4, max_bytes=1 << 20)  # over the count: the two earliest finished go
    assert list(jobs) == [order[0], order[3], order[4], order[5]]
    forget_finished(jobs, keep=100, max_bytes=25)  # over the bytes: the earliest finished goes
    assert list(jobs) == [order[0], order[3], order[5]]  # a running job always stays
