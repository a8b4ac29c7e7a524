"""``overpaint demo``: edit a bundled Shapes scene ("a ... red circle ..." -> "a ... blue circle ...").

The example scene is rendered by the world generator (no stored image), inverted and
edited with the bundled ``shapes`` model using the method that scores highest on
ShapesEdit colour swaps (``METHOD``: Prompt-to-Prompt on the edit-friendly DDPM
inversion), settings from ``engine.shapes.recipes``. Writes, into the output
folder, ``input.png``, ``reconstruction.png``, ``edited.png`` and ``side_by_side.png``
(all upscaled x4, nearest neighbour, for viewing), and returns what the analyser reads.
No network; well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from engine.shapes import analyser, recipes, world

METHOD = "p2p"
SCENE = world.Scene((world.Obj("circle", "red", "center", "large"),), "white", seed=7)
EDIT = world.Edit("colour", 0, "blue")
ZOOM = 4
GAP = 4  # pixels between panels of the side-by-side image


def _upscale(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> [ZOOM*H, ZOOM*W, 3], nearest neighbour."""
    return img.repeat(ZOOM, axis=0).repeat(ZOOM, axis=1)


def _uint8(images) -> np.ndarray:
    """images [1, 3, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    return (images[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def side_by_side(panels: list[np.ndarray]) -> np.ndarray:
    """Panels [H, W, 3] in a row on a white strip, GAP pixels apart."""
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + GAP * (len(panels) + 1)
    out = np.full((h + 2 * GAP, w, 3), 255, np.uint8)
    x = GAP
    for p in panels:
        out[GAP:GAP + p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + GAP
    return out


def run(out_dir: str | Path, model: str = "shapes", method: str = METHOD, pipe=None) -> dict:
    """Write the four demo images into ``out_dir``; returns paths, prompts and the analyser's readings."""
    from PIL import Image

    import engine
    from engine.images import save_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = pipe or engine.load(model)
    source = world.render(SCENE)  # uint8 [64, 64, 3]
    change = recipes.change_of(SCENE, EDIT)
    inv = recipes.invert(pipe, source, change.source_prompt, method)
    recon = _uint8(recipes.reconstruct(pipe, inv, method))
    edited = _uint8(recipes.edit(pipe, inv, method, change))
    images = {"input": source, "reconstruction": recon, "edited": edited}
    paths = {}
    for name, img in images.items():
        paths[name] = save_image(Image.fromarray(_upscale(img)), out / f"{name}.png")
    paths["side_by_side"] = save_image(Image.fromarray(side_by_side([_upscale(i) for i in images.values()])),
                                       out / "side_by_side.png")
    return {
        "paths": paths, "method": method, "source_prompt": change.source_prompt,
        "target_prompt": change.target_prompt,
        "seen": {k: analyser.describe(v) for k, v in images.items()}, "seconds": round(time.time() - t0, 1),
    }
