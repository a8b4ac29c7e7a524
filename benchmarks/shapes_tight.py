"""Tight Inversion on the Shapes model: image-conditioned inversion through the bundled IP-Adapter.

    python benchmarks/shapes_tight.py --threads 2                     # 14 colour swaps, scales 0 .. 1
    python benchmarks/shapes_tight.py --cases 4 --scales 0 1 --methods ddim

For each ShapesEdit colour swap (the benchmark's seeded cases) and each ``image_scale`` (0 is the
plain inversion), each method (DDIM, LEDITS++; their Shapes recipes) inverts the source once,
conditioned on the source image through the IP-Adapter, and reports:

  recon_psnr / recon_vs_vae_psnr  regeneration without edit vs the source / the VAE's round trip
  success / bg_psnr               the colour swap's success (analyser) and background PSNR
  recon_cfg_psnr                  DDIM only: inversion and regeneration at guidance 7.5 (the
                                  paper's setting, where plain DDIM inversion drifts)

The fidelity / editability trade-off is the curve (bg_psnr, success) over the scales. Writes
``benchmarks/results/shapes_tight-<device>.json`` and ``.png``.
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
from benchmarks.shapes_edit import _u8, edit_region, edit_success, make_cases  # noqa: E402
from engine.shapes import metrics, recipes, world  # noqa: E402
from engine.shapes.train_ip import ADAPTER_FILE, EXPORT  # noqa: E402

CFG = 7.5  # the paper's guidance for SDXL DDIM inversion and regeneration


def condition(scale: float) -> dict:
    return {} if scale == 0 else dict(image_condition=True, image_scale=scale)


def run_case(pipe, method: str, scene, e, scale: float) -> dict:
    src = world.render(scene)
    change = recipes.change_of(scene, e)
    t0 = time.perf_counter()
    inv = recipes.invert(pipe, src, change, method, **condition(scale))
    t_inv = time.perf_counter() - t0
    rec = _u8(recipes.reconstruct(pipe, inv, method))
    vae = _u8(pipe.decode(inv.x0))
    im = _u8(recipes.edit(pipe, inv, method, change))
    row = dict(recon_psnr=metrics.psnr(rec, src), recon_vs_vae_psnr=metrics.psnr(rec, vae), invert_s=t_inv,
               success=bool(edit_success(im, scene, e)), bg_psnr=metrics.masked_psnr(im, src, edit_region(scene, e)))
    if method == "ddim":  # the guided setting
        guided = recipes.invert(pipe, src, change, method, guidance_scale=CFG, **condition(scale))
        out = _u8(pipe.edit(guided, "ddim", None, output_type="pt", progress=False))
        row.update(recon_cfg_psnr=metrics.psnr(out, src), recon_cfg_vs_vae_psnr=metrics.psnr(out, vae))
    return row


def plot(summary: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for m in sorted({r["method"] for r in summary}):
        rows = [r for r in summary if r["method"] == m]
        a.plot([r["bg_psnr"] for r in rows], [100 * r["success"] for r in rows], "o-", label=m)
        for r in rows:
            a.annotate(f"{r['image_scale']:g}", (r["bg_psnr"], 100 * r["success"]), fontsize=8)
        b.plot([r["image_scale"] for r in rows], [r["recon_psnr"] for r in rows], "o-", label=f"{m} (recipe)")
        if "recon_cfg_psnr" in rows[0]:
            b.plot([r["image_scale"] for r in rows], [r["recon_cfg_psnr"] for r in rows], "s--",
                   label=f"{m}, guidance {CFG:g}")
    a.set(xlabel="background PSNR (dB)", ylabel="colour swaps that succeed (%)",
          title="fidelity vs editability over image_scale")
    b.set(xlabel="image_scale", ylabel="reconstruction PSNR vs source (dB)", title="reconstruction")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=14, help="colour swaps")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--methods", default="ddim,ledits++")
    p.add_argument("--adapter", default=str(EXPORT / ADAPTER_FILE))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import engine

    pipe = engine.load("shapes")
    pipe.load_ip_adapter(a.adapter)
    cases = [c for c in make_cases(7 * a.cases) if c[1].kind == "colour"][: a.cases]
    methods = a.methods.split(",")
    rows, summary = [], []
    for m in methods:
        for s in a.scales:
            part = [dict(method=m, image_scale=s, case=i, **run_case(pipe, m, sc, e, s)) for i, (sc, e) in enumerate(cases)]
            rows += part
            keys = [k for k in part[0] if k not in ("method", "image_scale", "case")]
            summary.append(dict(method=m, image_scale=s, n=len(part),
                                **{k: float(np.mean([r[k] for r in part])) for k in keys}))
            r = summary[-1]
            cfg = f"  guided recon {r['recon_cfg_psnr']:.2f} dB" if "recon_cfg_psnr" in r else ""
            print(f"{m:<9} scale {s:<5g} recon {r['recon_psnr']:.2f} dB (vs VAE {r['recon_vs_vae_psnr']:.2f}){cfg}  "
                  f"swaps {100 * r['success']:.0f}%  bg {r['bg_psnr']:.2f} dB  invert {r['invert_s']:.2f} s", flush=True)
    meta = common.meta("cpu", dict(model="shapes", adapter=Path(a.adapter).name, cases=len(cases), scales=a.scales,
                                    methods=methods, threads=torch.get_num_threads(), guided_recon=CFG,
                                    recipes={m: recipes.INVERT[m] for m in methods}))
    path = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"shapes_tight-{common.slug(meta['device'])}.json"
    common.write_json(path, meta, dict(summary=summary, rows=rows))
    print(f"wrote {path}; plot {plot(summary, path.with_suffix('.png'))}")
    return dict(meta=meta, summary=summary)


if __name__ == "__main__":
    main()
