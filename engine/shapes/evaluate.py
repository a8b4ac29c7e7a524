"""Generation quality of a Shapes model, judged by the scene analyser.

    python -m engine.shapes.evaluate --model shapes                 # 100 prompts, JSON to stdout
    python -m engine.shapes.evaluate --model shapes --n 20 --steps 20 --guidance 5
    python -m engine.shapes.evaluate --model shapes-v2 --screens 1      # every scene on a green or blue screen

A fixed, seeded set of prompts (scenes of one or two objects, captions from the world
generator) is generated, one seeded starting latent per prompt. A prompt counts as a
success when, for every object it names, the analyser finds an object of that colour
and shape at that position ("named"); the stricter "exact" rate also asks for the size,
the background and no extra objects (``analyser.matches``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from engine.shapes import analyser, world

# sampler None: the model's; screens: the share of scenes on green or blue screens (world.sample_scene)
DEFAULTS = dict(n=100, seed=1234, steps=20, guidance=5.0, sampler=None, batch=25, screens=0.0)


def prompts(n: int, seed: int, screens: float = 0.0) -> list[world.Scene]:
    """``n`` scenes with one or two objects (alternating), fixed by ``seed``, a ``screens`` share
    of them on green or blue screens (0: the same scenes as before screens existed)."""
    rng = np.random.default_rng([seed, 11])
    return [world.sample_scene(rng, n_objects=1 + i % 2, screens=screens) for i in range(n)]


def named_ok(image, scene: world.Scene) -> bool:
    """Every named object is found with its colour and shape at its position."""
    found = {(d.colour, d.shape, d.position) for d in analyser.detect(image)}
    return all((o.colour, o.shape, o.position) in found for o in scene.objects)


def attribute_rates(images, scenes: list[world.Scene]) -> dict[str, float]:
    """Where generation goes wrong: the share of prompts with the right background, and of
    named objects for which an object of that colour exists (anywhere), also with the named
    shape, also at the named position."""
    bg, parts = [], {"colour": [], "colour+shape": [], "colour+position": []}
    for image, scene in zip(images, scenes):
        bg.append(analyser.detect_background(image) == scene.background)
        found = analyser.detect(image)
        for o in scene.objects:
            parts["colour"].append(any(d.colour == o.colour for d in found))
            parts["colour+shape"].append(any((d.colour, d.shape) == (o.colour, o.shape) for d in found))
            parts["colour+position"].append(any((d.colour, d.position) == (o.colour, o.position) for d in found))
    return {"background": float(np.mean(bg)), **{k: float(np.mean(v)) for k, v in parts.items()}}


def start_latents(pipe, seeds: list[int]) -> torch.Tensor:
    """One starting latent per prompt from its own CPU generator: [B, C, h, w]."""
    side = pipe.default_size // pipe.vae_scale_factor
    shape = (1, pipe.latent_channels, side, side)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(pipe, scenes: list[world.Scene], seed: int, steps: int, guidance: float, sampler: str,
             batch: int) -> np.ndarray:
    """Images [N, 64, 64, 3] uint8, generated in batches of ``batch`` prompts."""
    out = []
    for lo in range(0, len(scenes), batch):
        chunk = scenes[lo:lo + batch]
        lat = start_latents(pipe, [seed * 100_000 + lo + i for i in range(len(chunk))])
        imgs = pipe.generate([world.caption(s) for s in chunk], steps=steps, guidance_scale=guidance,
                             sampler=sampler, latents=lat, output_type="np", progress=False)
        out.append((imgs * 255).round().astype(np.uint8))
    return np.concatenate(out)


def evaluate(pipe, n: int = DEFAULTS["n"], seed: int = DEFAULTS["seed"], steps: int = DEFAULTS["steps"],
             guidance: float = DEFAULTS["guidance"], sampler: str = DEFAULTS["sampler"],
             batch: int = DEFAULTS["batch"], screens: float = DEFAULTS["screens"]) -> dict:
    """Generate ``n`` seeded prompts and score them; returns a JSON-ready dict."""
    scenes = prompts(n, seed, screens)  # a screens share outside [0, 1] is refused there
    sampler = sampler or pipe.default_sampler
    t0 = time.time()
    images = generate(pipe, scenes, seed, steps, guidance, sampler, batch)
    wall = time.time() - t0
    named = [named_ok(im, s) for im, s in zip(images, scenes)]
    exact = [analyser.matches(im, s) for im, s in zip(images, scenes)]
    by_count = {k: float(np.mean([ok for ok, s in zip(named, scenes) if len(s.objects) == k]))
                for k in sorted({len(s.objects) for s in scenes})}
    failures = [{"prompt": world.caption(s), "seen": analyser.describe(im)}
                for im, s, ok in zip(images, scenes, named) if not ok]
    return {
        "n": n, "seed": seed, "sampler": sampler, "steps": steps, "guidance": guidance, "screens": screens,
        "named_rate": float(np.mean(named)), "exact_rate": float(np.mean(exact)),
        "named_rate_by_objects": by_count, "attributes": attribute_rates(images, scenes), "generate_s": round(wall, 1), "failures": failures[:10],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="pipeline folder or bundled name (default: shapes)")
    p.add_argument("--n", type=int, default=DEFAULTS["n"], help="number of prompts")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--guidance", type=float, default=DEFAULTS["guidance"])
    p.add_argument("--sampler", default=DEFAULTS["sampler"])
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    p.add_argument("--screens", type=float, default=DEFAULTS["screens"],
                   help="share of the scenes on green or blue screens (default 0)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    if not 0 <= a.screens <= 1:
        p.error(f"--screens is a share between 0 and 1, got {a.screens}")
    if a.threads:
        torch.set_num_threads(a.threads)
    import engine

    res = {"model": a.model, **evaluate(engine.load(a.model), a.n, a.seed, a.steps, a.guidance, a.sampler, a.batch,
                                           a.screens)}
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
