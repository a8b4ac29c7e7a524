"""TKG-DM chroma-key generation on the Shapes model: keyed backgrounds, objects, and mattes.

    python benchmarks/shapes_chroma.py                      # 100 prompts, every key
    python benchmarks/shapes_chroma.py --prompts 8 --keys green --out /tmp/c.json   # smoke

For each key colour, the objects-only prompts of ``engine.shapes.evaluate`` (one or two
objects, no background words) are generated from the same seeded noise, plain and with
``chroma_key``; the scene analyser reads each image and we report

  key_bg      share of prompts whose background (the pixels outside the analyser's objects,
              dilated 1 px) is at least 90% the key colour (nearest named colour in the
              analyser's palette -- the key itself for the world's classic background
              colours; for green and blue: the palette's, which the screens are painted in)
  named_ok    share of prompts whose named objects are all found (colour, shape, position)
  both_ok     share of prompts with both (keyed background and every named object)
  *_clear     the same over the prompts that name no object in the key's colour (a green
              object on a green screen disappears into it; n_clear counts them), with the
              plain generation's named rate over them (plain_named_ok_clear)
  direction   the latent direction the key shifted (``pipe.chroma_direction``)
  per_prompt  each prompt's keyed / named / clear outcome
  alpha_ok    share of pixels where the RGBA matte (``alpha=True``) agrees with the
              analyser's masks: alpha < 0.5 on the background, > 0.5 on objects (prompts
              with a keyed background)

plus the plain generation's background rates for comparison, and a figure: a grid of prompts
with their transparent outputs over a checkerboard. Writes
``benchmarks/results/shapes_chroma-<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from engine.matte import chroma_matte  # noqa: E402
from engine.shapes import analyser, world  # noqa: E402
from engine.shapes import evaluate as E  # noqa: E402

# The keys: green and blue by name (the method's purpose: broadcast chroma green (0, 177, 64) and
# blue (0, 71, 187); a model trained with screens, world.SCREENS, paints them) and the world's
# classic background colours as (r, g, b).
KEYS = {"green": "green", "blue": "blue", **{name: rgb for name, rgb in world.BACKGROUNDS.items()}}
PALETTE = {name: name for name in KEYS}  # the analyser's name of each key's colour


def objects_prompt(scene: world.Scene) -> str:
    return world.fragment(scene, range(len(scene.objects)))


def object_mask(image: np.ndarray) -> np.ndarray:
    found = analyser.detect(image)
    m = np.zeros(image.shape[:2], bool)
    for d in found:
        m |= d.mask
    return m


def score(images: np.ndarray, rgba: np.ndarray, scenes, key_name: str, plain_named=None) -> dict:
    """One key's figures (see the module's docstring); ``plain_named`` (per prompt, from the
    plain generation) adds the plain rate over the same clear prompts, and per_prompt holds
    each prompt's outcome."""
    key_id = analyser.names().index(PALETTE[key_name])
    keyed, named, agree = [], [], []
    for im, a, s in zip(images, rgba, scenes):
        obj = object_mask(im)
        bg = ~analyser.dilate(obj, 1)
        lab = analyser.label_pixels(im)
        ok = bool(bg.any() and (lab[bg] == key_id).mean() >= 0.9)
        keyed.append(ok)
        named.append(E.named_ok(im, s))
        if ok and a is not None:
            alpha = a[..., 3]
            agree.append(float(np.mean(np.where(obj, alpha > 0.5, alpha < 0.5))))
    keyed, named = np.array(keyed), np.array(named)
    # Prompts that name no object in the key's colour: a green object on a green screen is
    # invisible to the analyser (and keyed out by any matte), so users keep it off the key.
    clear = np.array([all(o.colour != PALETTE[key_name] for o in s.objects) for s in scenes])

    def over_clear(v):
        return float(np.asarray(v)[clear].mean()) if clear.any() else None

    out = dict(key_bg=float(keyed.mean()), named_ok=float(named.mean()), both_ok=float((keyed & named).mean()),
               n_clear=int(clear.sum()), named_ok_clear=over_clear(named), both_ok_clear=over_clear(keyed & named),
               alpha_ok=float(np.mean(agree)) if agree else None, n=len(scenes),
               per_prompt=dict(keyed=keyed.tolist(), named=named.tolist(), clear=clear.tolist()))
    if plain_named is not None:
        out["plain_named_ok_clear"] = over_clear(plain_named)
    return out


def checkerboard(h: int, w: int, cell: int = 4) -> np.ndarray:
    y, x = np.indices((h, w))
    c = np.where(((y // cell) + (x // cell)) % 2 == 0, 0.8, 0.6)
    return np.repeat(c[..., None], 3, axis=2)


def plot(samples: dict, prompts: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(samples)
    n = len(prompts)
    fig, axes = plt.subplots(len(keys) * 2, n, figsize=(1.5 * n, 3.2 * len(keys)))
    for r, k in enumerate(keys):
        for c in range(n):
            img, rgba = samples[k][0][c], samples[k][1][c]
            board = checkerboard(*rgba.shape[:2])
            over = rgba[..., :3] * rgba[..., 3:] + board * (1 - rgba[..., 3:])
            for j, pic in enumerate((img, over)):
                ax = axes[2 * r + j, c]
                ax.imshow(pic)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(f"{k}\n{'keyed' if j == 0 else 'RGBA'}", fontsize=7)
                if r == 0 and j == 0:
                    ax.set_title(textwrap.fill(prompts[c], 24), fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--keys", default=",".join(KEYS))
    p.add_argument("--seed", type=int, default=E.DEFAULTS["seed"])
    p.add_argument("--steps", type=int, default=E.DEFAULTS["steps"])
    p.add_argument("--guidance", type=float, default=E.DEFAULTS["guidance"])
    p.add_argument("--batch", type=int, default=E.DEFAULTS["batch"])
    p.add_argument("--figure-prompts", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/shapes_chroma-<device>.json)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    keys = [k.strip() for k in a.keys.split(",") if k.strip()]
    bad = [k for k in keys if k not in KEYS]
    if bad:
        p.error(f"unknown keys {bad}; choose from {list(KEYS)}")
    import engine

    pipe = engine.load(a.model)
    scenes = E.prompts(a.prompts, a.seed)
    prompts = [objects_prompt(s) for s in scenes]

    def run(**kw):
        ims, mats = [], []
        for lo in range(0, len(scenes), a.batch):
            chunk = prompts[lo:lo + a.batch]
            lat = E.start_latents(pipe, [a.seed * 100_000 + lo + i for i in range(len(chunk))])
            common_kw = dict(steps=a.steps, guidance_scale=a.guidance, latents=lat, progress=False)
            out = pipe.generate(chunk, output_type="pt", **common_kw, **kw)  # [b, 3, H, W]
            ims.append(out.permute(0, 2, 3, 1).numpy())
            if "chroma_key" in kw:  # what generate(alpha=True) returns, from the same images
                mats.append(chroma_matte(out, kw["chroma_key"]).permute(0, 2, 3, 1).numpy())
        images = (np.concatenate(ims) * 255).round().astype(np.uint8)
        return images, np.concatenate(mats) if mats else None

    t0 = time.time()
    plain, _ = run()
    plain_named = [E.named_ok(im, s) for im, s in zip(plain, scenes)]
    results = {"plain": dict(backgrounds={b: float(np.mean([analyser.detect_background(im) == b for im in plain]))
                                          for b in world.ALL_BACKGROUNDS},
                             named_ok=float(np.mean(plain_named)), per_prompt=dict(named=plain_named))}
    samples = {}
    for k in keys:
        tic = time.time()
        images, rgba = run(chroma_key=KEYS[k])
        results[k] = dict(score(images, rgba, scenes, k, plain_named), direction=pipe.chroma_direction(KEYS[k]),
                          seconds=round(time.time() - tic, 1))
        samples[k] = (images[:a.figure_prompts] / 255.0, rgba[:a.figure_prompts])
        r = results[k]
        clear = (f"  no {k} object named ({r['n_clear']}): named {r['named_ok_clear']:.0%} "
                 f"(plain {r['plain_named_ok_clear']:.0%}), both {r['both_ok_clear']:.0%}"
                 if r["n_clear"] else "")
        print(f"{k:>6}: key background {r['key_bg']:.0%}  named objects {r['named_ok']:.0%}  both {r['both_ok']:.0%}"
              f"{clear}  alpha agrees {r['alpha_ok'] if r['alpha_ok'] is None else round(r['alpha_ok'], 3)}", flush=True)
    meta = common.meta("cpu", dict(model=a.model, prompts=a.prompts, seed=a.seed, steps=a.steps, guidance=a.guidance,
                                   keys={k: KEYS[k] for k in keys}, chroma_shift=0.11, chroma_std=0.5,
                                   threads=torch.get_num_threads(), wall_s=round(time.time() - t0, 1)))
    path = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"shapes_chroma-{common.slug(meta['device'])}.json"
    common.write_json(path, meta, [results])
    common.plot_or_warn(plot, samples, prompts[:a.figure_prompts], path.with_suffix(".png"))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
