"""Scene analyser: read the objects back out of a (rendered or generated) Shapes image.

Steps: classify every pixel to the nearest named colour (allowing for the world's
shading and gradient); the background is the most common label on the image
border; connected components (8-neighbour) of non-background pixels are the
objects. Each object's colour is the majority label of its pixels, its shape
comes from two scale-free mask features, its position from the centroid's
column and its size from the bounding-box extent.

Shape features (central moments of the object mask, y downwards; see shape_features):
    skew  = skewness of the rows: apex-up triangle -0.57, others 0
    cross = E[x^2 y^2] / E[x^4]: diamond 1/6, circle 1/3, square 5/9

    detect(image) -> [Detected]      detect_background(image) -> str
    matches(image, scene) -> bool     object_ok(image, obj) -> bool
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.shapes.world import ALL_BACKGROUNDS, COLOURS, SIZE, Obj, Scene

_FACTORS = (0.9, 0.95, 1.0, 1.05)  # brightness variants the shading/gradient can produce
_NAMES = list(dict.fromkeys(list(COLOURS) + list(ALL_BACKGROUNDS)))
MIN_PIXELS = 12  # smaller components are noise, not objects
LARGE_EXTENT = 15  # bounding boxes are 12 px (small) or 18 px (large)


@dataclass
class Detected:
    shape: str
    colour: str
    position: str
    size: str
    mask: np.ndarray  # bool [64, 64]

    def as_obj(self) -> Obj:
        return Obj(self.shape, self.colour, self.position, self.size)


def _palette() -> tuple[np.ndarray, np.ndarray]:
    """Reference colours [K, 3] and their name indices [K]."""
    table = {**COLOURS, **ALL_BACKGROUNDS}
    refs, ids = [], []
    for i, name in enumerate(_NAMES):
        for f in _FACTORS:
            refs.append(np.clip(np.asarray(table[name], np.float32) * f, 0, 255))
            ids.append(i)
    return np.stack(refs), np.asarray(ids)


_REFS, _IDS = _palette()


def to_rgb255(image) -> np.ndarray:
    """Accept uint8 or float ([0, 1]) arrays/tensors, HWC or CHW; return float32 [H, W, 3] in 0..255."""
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {a.shape}")
    a = a.astype(np.float32)
    if not np.issubdtype(np.asarray(image).dtype, np.integer):
        a = a * 255.0
    return np.clip(a, 0, 255)


def label_pixels(image) -> np.ndarray:
    """Nearest named colour index (into ``names()``) for every pixel, int [H, W]."""
    return _label(to_rgb255(image))


def _label(a: np.ndarray) -> np.ndarray:
    flat = a.reshape(-1, 3)  # [H*W, 3]
    # squared distance to every reference, expanded so it is one matmul: [H*W, K]
    d = (flat * flat).sum(1, keepdims=True) - 2.0 * flat @ _REFS.T + (_REFS * _REFS).sum(1)[None]
    return _IDS[d.argmin(1)].reshape(a.shape[:2])


def names() -> list[str]:
    return list(_NAMES)


def detect_background(image, labels: np.ndarray | None = None) -> str:
    """Most common background-colour label on a 2-pixel border."""
    lab = label_pixels(image) if labels is None else labels
    border = np.concatenate([lab[:2].ravel(), lab[-2:].ravel(), lab[:, :2].ravel(), lab[:, -2:].ravel()])
    counts = np.bincount(border, minlength=len(_NAMES))
    bg_ids = [_NAMES.index(b) for b in ALL_BACKGROUNDS]
    return _NAMES[bg_ids[int(np.argmax(counts[bg_ids]))]]


def components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a bool mask (0 = off, 1..n = components), int [H, W]."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:  # propagate the minimum label through each component until stable
        p = np.pad(lab, 1, constant_values=big)
        nb = np.minimum.reduce([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        new = np.where(mask, nb, big)
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.zeros((h, w), np.int64)
    for k, v in enumerate(np.unique(lab[mask]), start=1):
        out[lab == v] = k
    return out


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(cross, skew) of a mask from its central moments; both scale-free and blur-tolerant.

    cross = E[x^2 y^2] / mean(E[x^4], E[y^4]): diamond 1/6, circle 1/3, square 5/9
    (exact values for the ideal shapes); skew = E[y^3] / E[y^2]^1.5 of the rows,
    -0.57 for an apex-up triangle (its long tail points up) and 0 for the vertically symmetric shapes.
    """
    ys, xs = np.nonzero(mask)
    x = xs - xs.mean()
    y = ys - ys.mean()
    x4, y4 = (x ** 4).mean(), (y ** 4).mean()
    cross = float((x * x * y * y).mean() / max(0.5 * (x4 + y4), 1e-9))
    skew = float((y ** 3).mean() / max((y * y).mean() ** 1.5, 1e-9))
    return cross, skew


def shape_of(mask: np.ndarray) -> str:
    """Classify one object mask as circle / square / triangle / diamond."""
    cross, skew = shape_features(mask)
    if skew < -0.3:
        return "triangle"
    if cross > 0.44:
        return "square"
    return "circle" if cross > 0.295 else "diamond"


def _position(cx: float) -> str:
    return "left" if cx < SIZE / 3 else ("right" if cx >= 2 * SIZE / 3 else "center")


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of a bool mask [H, W] by r pixels (4-neighbourhood)."""
    out = mask.copy()
    for _ in range(r):
        p = np.pad(out, 1)
        out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def _refine(a: np.ndarray, seed: np.ndarray, colour: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Mask of pixels at least half-way from the background to the object colour.

    Nearest-colour labels put anti-aliased or blurred rim pixels wherever their mix
    happens to land; projecting onto the background->object line and cutting at
    alpha = 1/2 instead keeps the outline where the true edge is.
    """
    near = dilate(seed, 2)
    d = colour - bg  # [3]
    alpha = ((a - bg) @ d) / max(float(d @ d), 1.0)  # [H, W]
    m = near & (alpha >= 0.5)
    comp = components(m)
    keep = np.unique(comp[seed & m])
    keep = keep[keep > 0]
    return np.isin(comp, keep) if len(keep) else seed


def detect(image) -> list[Detected]:
    """All objects in the image, ordered left to right."""
    return _detect(to_rgb255(image))[1]


def _detect(a: np.ndarray) -> tuple[str, list[Detected]]:
    lab = _label(a)
    background = detect_background(None, lab)
    bg = _NAMES.index(background)
    bg_pixels = a[lab == bg]
    bg_rgb = np.median(bg_pixels, 0) if len(bg_pixels) else np.asarray(ALL_BACKGROUNDS[background], np.float32)
    comp = components(lab != bg)
    found = []
    for k in range(1, comp.max() + 1):
        m = comp == k
        if int(m.sum()) < MIN_PIXELS:
            continue
        votes = np.bincount(lab[m], minlength=len(_NAMES))
        obj_votes = votes[: len(COLOURS)]  # COLOURS come first in _NAMES
        colour = _NAMES[int(np.argmax(obj_votes if obj_votes.any() else votes))]
        core = m & (lab == _NAMES.index(colour))
        rgb = np.median(a[core], 0) if core.any() else np.asarray({**COLOURS, **ALL_BACKGROUNDS}[colour], np.float32)
        m = _refine(a, m, rgb, bg_rgb)
        if int(m.sum()) < MIN_PIXELS:
            continue
        ys, xs = np.nonzero(m)
        extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        size = "large" if extent >= LARGE_EXTENT else "small"
        found.append(Detected(shape_of(m), colour, _position(float(xs.mean() + 0.5)), size, m))
    return background, sorted(found, key=lambda d: float(np.nonzero(d.mask)[1].mean()))


def _key(o) -> tuple:
    return (o.shape, o.colour, o.position, o.size)


def matches(image, scene: Scene) -> bool:
    """True when background and the set of objects (all four attributes) agree exactly."""
    background, found = _detect(to_rgb255(image))
    if background != scene.background:
        return False
    return sorted(_key(d) for d in found) == sorted(_key(o) for o in scene.objects)


def object_ok(image, obj: Obj) -> bool:
    """True when some detected object has all of ``obj``'s attributes."""
    return any(_key(d) == _key(obj) for d in detect(image))


def describe(image) -> str:
    """The analyser's reading of an image as a caption (for reports and debugging)."""
    from engine.shapes.world import caption

    objs = tuple(d.as_obj() for d in detect(image))
    return caption(Scene(objs, detect_background(image), 0)) if objs else f"empty, on a {detect_background(image)} background"
