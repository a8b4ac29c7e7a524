"""ReNoise on the Shapes model: reconstruction error as the renoising iterations rise.

    python benchmarks/shapes_renoise.py --threads 2                  # 12 scenes, iterations 0 1 2 4
    python benchmarks/shapes_renoise.py --scenes 4 --iterations 0 2
    python benchmarks/shapes_renoise.py --sampler euler_ancestral --steps 10 --iterations 0 3 9   # the Turbo path

Each seeded scene (the ShapesEdit cases' sources) is inverted with ReNoise (the official SD
settings but ``renoise_steps``, 30 steps as the Shapes recipes) and regenerated under its own
caption without guidance; reported per setting: PSNR against the source and against the
VAE's round trip (the ceiling of any latent method) and seconds per inversion, with and
without the noise regularisation; plain DDIM inversion is the baseline row. With ``--sampler
euler_ancestral`` (SDXL-Turbo's path): with and without noise correction instead, the replay
driven by the inversion's noise maps. Writes ``benchmarks/results/shapes_renoise-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.shapes_edit import _u8, make_cases  # noqa: E402
from engine.shapes import metrics, recipes, world  # noqa: E402


def run(pipe, scenes, settings: dict, steps: int) -> dict:
    rec, vae, secs = [], [], []
    for s in scenes:
        src = world.render(s)
        t0 = time.perf_counter()
        inv = pipe.invert(src, world.caption(s), progress=False, steps=steps, **settings)
        secs.append(time.perf_counter() - t0)
        out = _u8(pipe.edit(inv, inv.method, None, output_type="pt", progress=False))
        rec.append(metrics.psnr(out, src))
        vae.append(metrics.psnr(out, _u8(pipe.decode(inv.x0))))
    return dict(recon_psnr=float(np.mean(rec)), recon_vs_vae_psnr=float(np.mean(vae)), invert_s=float(np.mean(secs)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--scenes", type=int, default=12)
    p.add_argument("--iterations", type=int, nargs="+", default=[0, 1, 2, 4], help="renoise_steps values")
    p.add_argument("--steps", type=int, default=recipes.STEPS)
    p.add_argument("--sampler", choices=("ddim", "euler_ancestral"), default="ddim")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import engine

    pipe = engine.load(a.model)
    scenes = [s for s, _ in make_cases(a.scenes)]
    euler = a.sampler == "euler_ancestral"
    rows = [] if euler else [dict(setting="ddim", **run(pipe, scenes, dict(method="ddim"), a.steps))]
    for k in a.iterations:
        cfg = dict(method="renoise", renoise_steps=k, max_first=max(k, 5), sampler=a.sampler)  # k at every step
        rows.append(dict(setting=f"renoise_steps={k}", renoise_steps=k, **run(pipe, scenes, cfg, a.steps)))
        other = dict(noise_correction=False) if euler else dict(lambda_ac=0.0, lambda_kl=0.0)
        rows.append(dict(setting=f"renoise_steps={k}, no {'noise correction' if euler else 'regularisation'}",
                         renoise_steps=k, **run(pipe, scenes, dict(cfg, **other), a.steps)))
    for r in rows:
        print(f"{r['setting']:<40} recon {r['recon_psnr']:.2f} dB  vs VAE {r['recon_vs_vae_psnr']:.2f} dB  "
              f"invert {r['invert_s']:.2f} s")
    meta = common.meta("cpu", dict(model=a.model, scenes=a.scenes, steps=a.steps, iterations=a.iterations, sampler=a.sampler,
                                    threads=torch.get_num_threads(), windows="official: (0, 5) first, (8, 10) else",
                                    edit="regeneration under the caption, no guidance (the inversion's replay)"))
    name = "shapes_renoise" + ("-euler" if euler else "")
    path = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"{name}-{common.slug(meta['device'])}.json"
    common.write_json(path, meta, rows)
    print(f"wrote {path}")
    return dict(meta=meta, results=rows)


if __name__ == "__main__":
    main()
