"""The server under load: N concurrent HTTP clients vs the same requests in-process.

    python benchmarks/serve.py                          # 1, 4, 16 clients, 60 s each, then a 10-minute soak
    python benchmarks/serve.py --duration 5 --soak 30   # what CI's smoke test runs (shorter)

The server (``engine.serving``, uvicorn on loopback, in this process, its own engine thread)
serves the bundled Shapes model with the inversion cache off, so every request is a full
edit: upload, inversion and edit, PNG back. Requests are ShapesEdit colour swaps sent as
OpenAI-style multipart ``/v1/images/edits`` with a mix of methods (Prompt-to-Prompt on the
edit-friendly DDPM inversion, LEDITS++, DDPM), the model's own recipes. For each client count
the clients send requests back to back for ``--duration`` seconds; we report edits per second
in the steady state (completions after the first third of the window, before its end, while
every client has a request in flight) and over the whole run (ramp-up and drain included),
p50/p95/p99 latency, model rows per step (the batcher's counters) and failures. One client is
"one at a time". The in-process reference runs the same 16 requests through
``pipe.invert_many`` + ``pipe.edit_many`` (the best batching this model gets, no HTTP). The soak
runs 16 clients for ``--soak`` seconds and counts failed and lost requests (sent minus
answered). Results: ``benchmarks/results/serve-<device>.json`` and ``.svg``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.shapes_edit import make_cases  # noqa: E402
from engine.shapes import recipes, world  # noqa: E402

METHODS = ("p2p", "ledits++", "ddpm")


def workload(n: int) -> list[dict]:
    """n colour swaps: the PNG, the form fields, and the in-process requests of the same edit."""
    from PIL import Image

    out = []
    for k, (scene, e) in enumerate([c for c in make_cases(7 * n) if c[1].kind == "colour"][:n]):
        method = METHODS[k % len(METHODS)]
        change = recipes.change_of(scene, e)
        pixels = world.render(scene)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        fields = {"prompt": change.target_prompt, "source_prompt": change.source_prompt, "method": method}
        if method == "ledits++":  # the recipe's concept: the new object's phrase
            fields["editing_prompt"] = f'["{change.concepts[0][0]}"]' if change.concepts[0] else None
        fields = {k: v for k, v in fields.items() if v is not None}
        out.append(dict(png=buf.getvalue(), fields=fields, pixels=pixels, change=change, method=method))
    return out


def in_process(pipe, work: list[dict]) -> dict:
    """The same edits through invert_many + edit_many (the model's own batching, no server)."""
    def run():
        invs = pipe.invert_many([dict(image=w["pixels"], prompt=w["fields"]["source_prompt"],
                                      method=pipe.card.inversion_for.get(w["method"], w["method"])) for w in work])
        reqs = []
        for w, inv in zip(work, invs):
            r = dict(inv=inv, method=w["method"], target_prompt=w["fields"]["prompt"])
            if w["method"] == "ledits++":
                r = dict(inv=inv, method="ledits++", editing_prompt=list(w["change"].concepts[0]) or [w["fields"]["prompt"]])
            reqs.append(r)
        return pipe.edit_many(reqs)

    run()  # warm-up
    t0 = time.perf_counter()
    run()
    s = time.perf_counter() - t0
    return dict(n=len(work), seconds=s, edits_per_s=len(work) / s)


def load(url: str, work: list[dict], clients: int, seconds: float, batcher) -> dict:
    """``clients`` threads sending requests back to back for ``seconds``."""
    import httpx

    lat, done_at, failures, sent, answered = [], [], [], [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    calls0, rows0 = batcher.loop.calls, batcher.loop.rows_run

    def client(i: int):
        with httpx.Client(base_url=url, timeout=600) as c:
            k = i
            while time.monotonic() < deadline:
                w = work[k % len(work)]
                k += clients
                with lock:
                    sent[0] += 1
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/images/edits", files={"image": ("scene.png", w["png"], "image/png")},
                               data=w["fields"])
                    ok, why = r.status_code == 200, f"{r.status_code} {r.text[:120]}"
                except httpx.HTTPError as e:
                    ok, why = False, repr(e)
                with lock:
                    answered[0] += 1
                    if ok:
                        lat.append(time.perf_counter() - t0)
                        done_at.append(time.monotonic())
                    else:
                        failures.append(why)

    t0, start = time.perf_counter(), time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    calls, rows = batcher.loop.calls - calls0, batcher.loop.rows_run - rows0
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    # Steady state: completions after the ramp-up (the first third of the window) and before the
    # deadline, while every client still has a request in flight; edits_per_s also counts the
    # ramp-up and the drain after the deadline.
    warm = start + seconds / 3
    steady = sum(1 for t in done_at if warm <= t <= deadline) / (deadline - warm)
    return dict(clients=clients, seconds=elapsed, edits=len(lat), edits_per_s=len(lat) / elapsed,
                steady_edits_per_s=steady,
                p50_s=q[49], p95_s=q[94], p99_s=q[98], rows_per_step=rows / max(calls, 1), steps=calls,
                failed=len(failures), lost=sent[0] - answered[0], failures=failures[:5])


def svg(path: Path, rows: list[dict], ref: dict) -> None:
    bars = [(f"{r['clients']} client(s)", r["steady_edits_per_s"]) for r in rows] + [("in-process edit_many", ref["edits_per_s"])]
    top, width, left, h = max(v for _, v in bars), 640, 190, 22
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{40 + len(bars) * (h + 6)}" '
             f'font-family="sans-serif" font-size="12"><text x="10" y="20" font-size="14">overpaint serve: '
             f'edits per second (Shapes model)</text>']
    for k, (name, v) in enumerate(bars):
        y, w = 32 + k * (h + 6), (width - left - 80) * v / top
        parts.append(f'<text x="10" y="{y + 15}">{name}</text><rect x="{left}" y="{y}" width="{w:.1f}" height="{h}" '
                     f'fill="{"#1f77b4" if "client" in name else "#999"}"/><text x="{left + w + 5:.1f}" y="{y + 15}">'
                     f'{v:.2f}</text>')
    path.write_text("\n".join(parts + ["</svg>"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--duration", type=float, default=60.0, help="seconds per client count")
    p.add_argument("--soak", type=float, default=600.0, help="seconds of the 16-client soak (0: none)")
    p.add_argument("--requests", type=int, default=16, help="distinct requests the clients cycle through")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import engine
    from engine.serving.api import ServeSettings
    from engine.serving.server import Background  # uvicorn in a thread on loopback, a free port

    pipe = engine.load("shapes")
    work = workload(a.requests)
    ref = in_process(pipe, work)
    print(f"in-process invert_many + edit_many: {ref['edits_per_s']:.2f} edits/s ({ref['n']} edits)", flush=True)
    rows, soak = [], None
    with Background(ServeSettings(model="shapes", cache_bytes=0, max_queue=1024), pipe) as server:
        batcher = server.state.batcher
        load(server.url, work[:2], 2, 2.0, batcher)  # warm-up
        for n in a.clients:
            rows.append(load(server.url, work, n, a.duration, batcher))
            r = rows[-1]
            print(f"{n:>3} clients: {r['steady_edits_per_s']:.2f} edits/s steady ({r['edits_per_s']:.2f} with ramps), p50 {r['p50_s']:.1f} s, p99 {r['p99_s']:.1f} s, "
                  f"{r['rows_per_step']:.1f} rows/step, {r['failed']} failed, {r['lost']} lost", flush=True)
        if a.soak > 0:
            soak = load(server.url, work, 16, a.soak, batcher)
            print(f"soak {a.soak:.0f} s x 16 clients: {soak['edits']} edits, {soak['failed']} failed, "
                  f"{soak['lost']} lost", flush=True)
    single = next((r for r in rows if r["clients"] == 1), None)
    top = max(rows, key=lambda r: r["clients"])
    def ratio(a, b):  # None where a window was too short to finish anything (CI's smoke run)
        return a / b if b else None

    summary = dict(vs_in_process=ratio(top["steady_edits_per_s"], ref["edits_per_s"]),
                   vs_one_at_a_time=ratio(top["steady_edits_per_s"], single["steady_edits_per_s"]) if single else None,
                   p99_over_p50=ratio(top["p99_s"], top["p50_s"]), targets=dict(vs_in_process=0.9, vs_one_at_a_time=1.3))
    meta = common.meta("cpu", dict(clients=a.clients, duration_s=a.duration, soak_s=a.soak, requests=a.requests,
                                   threads=a.threads, methods=list(METHODS), cache="off", model="shapes"))
    stem = f"serve-{common.slug(meta['device'])}"
    path = common.write_json(a.out / f"{stem}.json", meta, [dict(in_process=ref, levels=rows, soak=soak,
                                                                 summary=summary)])
    svg(a.out / f"{stem}.svg", rows, ref)
    print(f"{'clients':>7} {'steady/s':>8} {'all/s':>6} {'p50 s':>6} {'p95 s':>6} {'p99 s':>6} {'rows/step':>9} "
          f"{'failed':>6}")
    for r in rows:
        print(f"{r['clients']:>7} {r['steady_edits_per_s']:>8.2f} {r['edits_per_s']:>6.2f} {r['p50_s']:>6.1f} "
              f"{r['p95_s']:>6.1f} {r['p99_s']:>6.1f} {r['rows_per_step']:>9.1f} {r['failed']:>6}")
    nan = float("nan")
    print(f"{top['clients']} clients (steady state) vs in-process: {summary['vs_in_process'] or nan:.2f}x "
          f"(target >= 0.9); vs one at a time: {summary['vs_one_at_a_time'] or nan:.2f}x (target >= 1.3)")
    print(f"wrote {path}")
    failed = sum(r["failed"] + r["lost"] for r in rows) + (soak["failed"] + soak["lost"] if soak else 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
