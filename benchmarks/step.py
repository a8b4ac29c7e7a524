"""The one loop's batching gain: N concurrent edits through ``edit_many`` vs the same edits
one at a time, in one run, on the bundled Shapes model.

    python benchmarks/step.py                      # N = 1, 4, 16 on the CPU, 2 threads
    python benchmarks/step.py --model sd15 --device cuda --dtype fp16 --n 1 4 16 64   # SD1.5-sized, 512², GPU

Requests are ShapesEdit colour swaps (the first cases of ``shapes_edit.make_cases``),
alternately Prompt-to-Prompt (on the edit-friendly DDPM inversion) and LEDITS++, with the
recipes of ``engine.shapes.recipes``; inversions are computed before timing. For each N we
report edits per second batched and one by one (each a full ``edit_many`` call: prompt
encoding, the loop, VAE decoding), their ratio, and, from the loop's own counters, the
share of the loop's time spent outside the model call (merging plans and rows, guidance,
sampler updates, splitting). The batched results are checked against the one-by-one ones
(max abs difference). ``--model sd15`` runs the same requests on a random-weight model of
SD1.5's architecture (``benchmarks.common.build``) with the scenes upsampled to ``--size``
(512 by default there): the timings of SD1.5 at 512², where batching gains far more than on
the small Shapes UNet. Results: ``benchmarks/results/step-<model>-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.shapes_edit import make_cases  # noqa: E402
from engine.shapes import recipes, world  # noqa: E402

METHODS = ("p2p", "ledits++")


def requests(pipe, n: int, size: int | None, steps: int) -> list[dict]:
    """n edit requests (colour swaps, P2P and LEDITS++ in turn), their inversions done."""
    cases = [c for c in make_cases(7 * n) if c[1].kind == "colour"][:n]
    out = []
    for k, (scene, e) in enumerate(cases):
        m = METHODS[k % len(METHODS)]
        change = recipes.change_of(scene, e)
        src = world.render(scene)
        kw = dict(steps=steps) if size is None else dict(steps=steps, height=size, width=size)
        inv = recipes.invert(pipe, src, change.source_prompt, m, **kw)
        out.append(recipes.edit_request(inv, m, change))
    return out


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_n(pipe, reqs: list[dict], repeats: int, device: str) -> dict:
    def together():
        out = pipe.edit_many(reqs, output_type="pt")
        common.sync(device)
        return out

    def one_by_one():
        out = [pipe.edit_many([r], output_type="pt")[0] for r in reqs]
        common.sync(device)
        return out

    a, b = together(), one_by_one()  # warm-up, and the results to compare
    t_batched = timed(together, repeats)
    loop = pipe.last_loop
    t_single = timed(one_by_one, repeats)
    n = len(reqs)
    return dict(n=n, methods=[r["method"] for r in reqs], batched_s=t_batched, single_s=t_single,
                edits_per_s_batched=n / t_batched, edits_per_s_single=n / t_single, ratio=t_single / t_batched,
                model_calls=loop.calls, rows_per_call=loop.rows_run / max(loop.calls, 1),
                loop_s=loop.seconds, model_s=loop.model_seconds, outside_model_share=1 - loop.model_seconds / loop.seconds,
                max_abs_diff_vs_single=max(float((x - y).abs().max()) for x, y in zip(a, b)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=("shapes", "sd15"), default="shapes")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--size", type=int, default=None, help="upsample the 64x64 scenes to this size")
    p.add_argument("--steps", type=int, default=recipes.STEPS, help="inversion / edit steps (the recipes' by default)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    import engine
    from engine.step import Loop

    Loop.sync_timing = True  # model time measured to the end of the kernels on a GPU
    if a.model == "sd15":
        pipe = common.build("sd15", a.device, common.DTYPES[a.dtype]).ours
        a.size = a.size or 512
    else:
        pipe = engine.load("shapes", device=a.device, dtype=a.dtype)
    rows = []
    for n in a.n:
        reqs = requests(pipe, n, a.size, a.steps)
        rows.append(run_n(pipe, reqs, a.repeats, a.device))
        r = rows[-1]
        print(f"N={n:<3} batched {r['edits_per_s_batched']:.2f} edits/s, one by one {r['edits_per_s_single']:.2f}"
              f" edits/s, ratio {r['ratio']:.2f}x, outside the model {r['outside_model_share']:.1%}", flush=True)
    meta = common.meta(a.device, dict(n=a.n, threads=a.threads if a.device == "cpu" else None, repeats=a.repeats,
                                      size=a.size or 64, methods=list(METHODS), model=a.model, dtype=a.dtype,
                                      steps=a.steps, invert=recipes.INVERT, edit=recipes.EDIT))
    path = common.write_json(a.out / f"step-{a.model}-{common.slug(meta['device'])}.json", meta, rows)
    print(f"{'N':>4} {'batched/s':>10} {'single/s':>9} {'ratio':>6} {'outside model':>14} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['n']:>4} {r['edits_per_s_batched']:>10.2f} {r['edits_per_s_single']:>9.2f} {r['ratio']:>6.2f} "
              f"{r['outside_model_share']:>14.1%} {r['max_abs_diff_vs_single']:>11.2e}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    main()
