"""ShapesEdit: a seeded benchmark of real-image editing methods on the Shapes world.

    python benchmarks/shapes_edit.py                          # 210 cases, all methods, sweeps
    python benchmarks/shapes_edit.py --cases 14 --methods p2p,ledits++ --sweep-cases 0

Every case is a rendered scene (the "real" image), a world edit (colour, shape, position,
size, background, add, remove; balanced) and its exact ground-truth target, rendered with
the same seed so that untouched pixels are identical. For each method (settings in
``engine.shapes.recipes``) and case we invert the source once and report

  recon_psnr / recon_ssim  regeneration without edit vs the source image
  edit_psnr / edit_ssim    the edited image vs the ground-truth target
  bg_psnr                  edited vs source outside the edit region (the edited object's
                           footprint in source and target, dilated 2 px; for background
                           edits: the objects' interiors are what must be kept)
  success                  the analyser sees the edit (new object attributes at the new
                           position / the object gone / the new background)
  invert_s / edit_s        seconds per inversion and per edit

and the VAE's own encode-decode PSNR (the ceiling any latent method can reach). The sweep
varies each method's main parameter (``recipes.SWEEP``) on the first colour and shape cases
and plots background PSNR (fidelity) against success (editability). Results go to
``benchmarks/results/shapes_edit-<device>.json`` and ``shapes_edit-<device>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from engine.shapes import analyser, metrics, recipes, world  # noqa: E402

KINDS = ("colour", "shape", "position", "size", "background", "add", "remove")
SEED = 2024
SWEEP_KINDS = ("colour", "shape")


# ----------------------------------------------------------------------------- cases


def make_cases(n: int, seed: int = SEED) -> list[tuple[world.Scene, world.Edit]]:
    """``n`` (scene, edit) pairs, edit kinds in turn, fixed by ``seed``."""
    rng = np.random.default_rng([seed, 5])
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        n_obj = 2 if kind == "remove" else int(rng.integers(1, 3))  # a free slot for position/add
        scene = world.sample_scene(rng, n_objects=n_obj)
        out.append((scene, world.sample_edit(scene, rng, kind)))
    return out


def edit_region(scene: world.Scene, e: world.Edit) -> np.ndarray:
    """Pixels the edit may change, bool [64, 64] (excluded from the background PSNR)."""
    if e.kind == "background":  # keep only the objects' interiors
        keep = np.zeros((world.SIZE, world.SIZE), bool)
        for o in scene.objects:
            keep |= ~analyser.dilate(~(world.coverage(o) >= 1.0), 1)
        return ~keep
    target = world.apply(scene, e)
    objs = []
    if e.kind in ("colour", "shape", "position", "size", "remove"):
        objs.append(scene.objects[e.index])
    if e.kind != "remove":
        objs.append(target.objects[e.index])
    region = np.zeros((world.SIZE, world.SIZE), bool)
    for o in objs:
        region |= world.footprint(o)
    return analyser.dilate(region, 2)


def edit_success(image: np.ndarray, scene: world.Scene, e: world.Edit) -> bool:
    """The analyser sees the edited attribute(s) where the target puts them."""
    if e.kind == "background":
        return analyser.detect_background(image) == e.value
    found = analyser.detect(image)
    if e.kind == "remove":
        return not any(d.position == scene.objects[e.index].position for d in found)
    new = world.apply(scene, e).objects[e.index]
    want = (new.colour, new.shape, new.position) + ((new.size,) if e.kind == "size" else ())
    return any((d.colour, d.shape, d.position) + ((d.size,) if e.kind == "size" else ()) == want for d in found)


# ----------------------------------------------------------------------------- running


def _u8(images: torch.Tensor) -> np.ndarray:
    return (images[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def vae_psnr(pipe, images: list[np.ndarray]) -> float:
    """Mean PSNR of VAE encode -> decode (no diffusion)."""
    return float(np.mean([metrics.psnr(_u8(pipe.decode(pipe.encode_image(im))), im) for im in images]))


def run_case(pipe, methods: list[str], scene, e, sweep: bool = False) -> dict[str, dict | list[dict]]:
    """One case under each method: {method: metrics} (with ``sweep``: {method: one row per
    swept value}, no reconstruction). Methods with the same inversion settings share it."""
    src, tgt = world.render(scene), world.render(world.apply(scene, e))
    region = edit_region(scene, e)
    change = recipes.change_of(scene, e)
    inversions, out = {}, {}
    for m in methods:
        key = json.dumps([recipes.INVERT[m], recipes.inversion_prompt(m, change)], sort_keys=True)
        if key not in inversions:
            t0 = time.perf_counter()
            inv = recipes.invert(pipe, src, change, m)
            t_inv = time.perf_counter() - t0
            rec = None if sweep else _u8(recipes.reconstruct(pipe, inv, m))
            inversions[key] = (inv, t_inv, rec)
        inv, t_inv, rec = inversions[key]

        def scored(**overrides) -> dict:
            t = time.perf_counter()
            im = _u8(recipes.edit(pipe, inv, m, change, **overrides))
            return dict(edit_s=time.perf_counter() - t, edit_psnr=metrics.psnr(im, tgt), edit_ssim=metrics.ssim(im, tgt),
                        bg_psnr=metrics.masked_psnr(im, src, region), success=bool(edit_success(im, scene, e)))

        if sweep:
            name, values = recipes.SWEEP[m]
            out[m] = [dict(value=v, **scored(**{name: v})) for v in values]
        else:
            out[m] = dict(kind=e.kind, invert_s=t_inv, recon_psnr=metrics.psnr(rec, src),
                          recon_ssim=metrics.ssim(rec, src), **scored(), **null_text_baseline(pipe, inv, src, rec))
    return out


def null_text_baseline(pipe, inv, src: np.ndarray, rec: np.ndarray) -> dict:
    """For a null-text inversion, two DDIM baselines at its guidance (7.5), both scored against
    the source and against the VAE's own round trip (the ceiling any latent method meets: the
    Shapes VAE's ~33-36 dB caps the PSNR against the source):
      ddim_*         the paper's: its own DDIM inversion (guidance 1) replayed at 7.5 with the
                     plain unconditional embedding (what the optimisation improves on);
      ddim_guided_*  DDIM inverted at 7.5 too, and replayed at 7.5."""
    if inv.method != "null-text":
        return {}
    from engine.editing import Inversion

    plain = Inversion("ddim", inv.x0, inv.latents, inv.timesteps, inv.source, inv.uncond, settings=dict(inv.settings))
    base = _u8(pipe.edit(plain, "ddim", None, output_type="pt", progress=False))  # the inversion's guidance (7.5)
    scale = inv.settings["guidance_scale"]
    guided_inv = pipe.invert(src, inv.settings.get("prompt", ""), method="ddim", steps=inv.steps,
                             guidance_scale=scale, progress=False)
    guided = _u8(pipe.edit(guided_inv, "ddim", None, guidance_scale=scale, output_type="pt", progress=False))
    vae = _u8(pipe.decode(inv.x0))
    return dict(ddim_recon_psnr=metrics.psnr(base, src), recon_vs_vae_psnr=metrics.psnr(rec, vae),
                ddim_recon_vs_vae_psnr=metrics.psnr(base, vae), ddim_guided_recon_psnr=metrics.psnr(guided, src),
                ddim_guided_recon_vs_vae_psnr=metrics.psnr(guided, vae))


def summarise(rows: list[dict]) -> dict:
    keys = ("recon_psnr", "recon_ssim", "edit_psnr", "edit_ssim", "bg_psnr", "success", "invert_s", "edit_s")
    mean = lambda rs, k: float(np.mean([r[k] for r in rs])) if rs else None  # noqa: E731
    out = {k: mean(rows, k) for k in keys}
    for k in ("ddim_recon_psnr", "recon_vs_vae_psnr", "ddim_recon_vs_vae_psnr", "ddim_guided_recon_psnr",
              "ddim_guided_recon_vs_vae_psnr"):  # null-text's baselines
        if rows and k in rows[0]:
            out[k] = mean(rows, k)
    out["by_kind"] = {kind: {k: mean([r for r in rows if r["kind"] == kind], k) for k in ("success", "bg_psnr", "edit_psnr")}
                      for kind in KINDS if any(r["kind"] == kind for r in rows)}
    out["n"] = len(rows)
    return out


# ----------------------------------------------------------------------------- output


def plot(sweeps: dict, summary: dict, path: Path) -> Path:
    """Fidelity (background PSNR) against editability (success rate), one curve per sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for method, pts in sweeps.items():
        xs, ys = [p["bg_psnr"] for p in pts], [100 * p["success"] for p in pts]
        ax.plot(xs, ys, "o-", label=f"{method} ({recipes.SWEEP[method][0]})")
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(f"{p['value']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for method, s in summary.items():
        if method not in sweeps and s.get("bg_psnr") is not None:
            ax.plot([s["bg_psnr"]], [100 * s["success"]], "s", label=f"{method} (all cases)")
    ax.set_xlabel("background PSNR vs source (dB)  -> fidelity")
    ax.set_ylabel("edit success (%)  -> editability")
    ax.set_title("ShapesEdit: fidelity vs editability", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--cases", type=int, default=210, help="number of edit cases (kinds in turn)")
    p.add_argument("--kinds", default=None, help=f"comma separated edit kinds to keep (default: all of {', '.join(KINDS)}); "
                   "the cases are the first --cases of those kinds in the same stream (the sweeps keep their own "
                   "colour and shape cases; --sweep-cases 0 drops them)")
    p.add_argument("--methods", default=None, help="comma separated (default: every recipe of the model)")
    p.add_argument("--sweep-cases", type=int, default=28, help="colour/shape cases for the sweeps (0: none)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/shapes_edit-<device>.json)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import engine

    pipe = engine.load(a.model)
    known = recipes.methods_for(pipe)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else list(known)
    bad = [m for m in methods if m not in known]
    if bad:
        p.error(f"unknown methods {bad} for this model; choose from {known}")
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()] if a.kinds is not None else list(KINDS)
    if not kinds:
        p.error(f"--kinds needs at least one of {', '.join(KINDS)}")
    if set(kinds) - set(KINDS):
        p.error(f"unknown edit kinds {sorted(set(kinds) - set(KINDS))}; choose from {', '.join(KINDS)}")
    kinds = [k for k in KINDS if k in kinds]  # one order, so the same kinds name the same file
    # Kinds come in turn, so the first len(KINDS)·n cases hold n of each kind.
    cases = ([c for c in make_cases(a.cases * len(KINDS), a.seed) if c[1].kind in kinds][:a.cases]
             if a.kinds else make_cases(a.cases, a.seed))
    t0 = time.time()
    results = {"vae": {"recon_psnr": vae_psnr(pipe, [world.render(s) for s, _ in cases])}}
    per_case = {m: [] for m in methods}
    for i, (s, e) in enumerate(cases):
        for m, row in run_case(pipe, methods, s, e).items():
            per_case[m].append(row)
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(cases)} cases, {time.time() - t0:.0f} s", flush=True)
    for m in methods:
        results[m] = summarise(per_case[m])
        print(f"{m}: {json.dumps({k: v for k, v in results[m].items() if k != 'by_kind'})}", flush=True)
    swept = [m for m in methods if m in recipes.SWEEP]
    pool = [c for c in make_cases(max(a.sweep_cases * 4, 1), a.seed + 1) if c[1].kind in SWEEP_KINDS][:a.sweep_cases]
    sweep_rows = [run_case(pipe, swept, s, e, sweep=True) for s, e in pool] if swept and a.sweep_cases > 0 else []
    sweeps = {m: [{"value": v, **{k: float(np.mean([r[m][j][k] for r in sweep_rows]))
                                  for k in ("bg_psnr", "success", "edit_psnr")}}
                  for j, v in enumerate(recipes.SWEEP[m][1])] for m in swept if sweep_rows}
    device = common.device_name("cuda" if torch.cuda.is_available() else "cpu")
    tag = f"-{'-'.join(kinds)}" if a.kinds else ""  # a run of some kinds never overwrites the full run's file
    path = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"shapes_edit{tag}-{common.slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device, threads=torch.get_num_threads(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=common.git_commit(), uncommitted=common.uncommitted(), model=a.model, wall_s=round(time.time() - t0, 1),
                versions={"torch": torch.__version__, "python": platform.python_version()},
                settings=dict(cases=a.cases, kinds=kinds, seed=a.seed, methods=methods, sweep_cases=len(pool), invert=recipes.INVERT,
                              edit=recipes.EDIT, sweep={k: list(v[1]) for k, v in recipes.SWEEP.items()},
                              sweep_param={k: v[0] for k, v in recipes.SWEEP.items()}))
    data = dict(meta=meta, results=results, sweeps=sweeps,
                cases=[dict(caption=world.caption(s), kind=e.kind, value=str(e.value)) for s, e in cases],
                per_case=per_case)
    path.write_text(json.dumps(data, indent=1))
    if sweeps or results:
        common.plot_or_warn(plot, sweeps, {m: results[m] for m in methods}, path.with_suffix(".png"))
    print(f"wrote {path} ({meta['wall_s']} s)")
    return data


if __name__ == "__main__":
    main()
