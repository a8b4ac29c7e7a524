"""The Shapes world: seeded procedural 64x64 scenes with exact captions, masks and edits.

A scene holds 1-3 objects, each in its own horizontal slot (left / center / right),
so objects never overlap. Every object is fully described by (shape, colour,
position, size); its geometry follows from position and size alone. The texture
(background gradient direction, per-pixel noise field) depends only on the scene
seed, and object shading only on the object's geometry, so an edited scene
rendered with the same seed changes exactly the pixels the edit touches.

    sample_scene(rng) -> Scene             render(scene)       -> uint8 [64, 64, 3]
    caption(scene)    -> str               render_masks(scene) -> bool [n, 64, 64]
    fragment(scene, objects, background) -> str (a partial caption)
    sample_edit(scene, rng) -> Edit        apply(scene, edit)  -> Scene
    edit_prompt(scene, edit) -> str        word_swap(src, tgt) -> [(i, old, new)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond")
# Well-separated named colours (min pairwise RGB distance ~86 including backgrounds).
COLOURS = {
    "red": (215, 35, 35), "green": (40, 165, 60), "blue": (40, 75, 215), "yellow": (240, 210, 40),
    "orange": (245, 135, 25), "purple": (135, 55, 175), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20), "beige": (225, 205, 165)}
# Green and blue screens: backgrounds in the objects' green and blue (near broadcast chroma green
# (0, 177, 64) and blue (0, 71, 187)), so a model trained with them can paint a keyable backdrop
# (TKG-DM). Training draws them with probability ``screens`` (sample_scene); edits, and evaluation
# scenes unless asked for (evaluate.py --screens), keep to BACKGROUNDS, so benchmark cases are the
# same whichever model is measured.
SCREENS = {"green": COLOURS["green"], "blue": COLOURS["blue"]}
ALL_BACKGROUNDS = {**BACKGROUNDS, **SCREENS}  # every background a scene can have, classic ones first
POSITIONS = ("left", "center", "right")
SIZES = ("small", "large")
CENTER_X = {"left": 11.0, "center": 32.0, "right": 53.0}  # slots 21 px apart: large objects keep a 3 px gap
HALF = {"small": 6.0, "large": 9.0}  # half extent of the bounding box in pixels
CENTER_Y = 32.0
EDIT_KINDS = ("colour", "shape", "position", "size", "background", "add", "remove")
_SUPER = 4  # supersampling factor for anti-aliased coverage


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    seed: int


@dataclass(frozen=True)
class Edit:
    """One edit: ``index`` names the object (-1 for background; the new object's index for
    add); ``value`` is the new attribute value (a str), the new ``Obj`` for "add", None for
    "remove". Kinds: colour, shape, position, size, background, add, remove."""

    kind: str
    index: int
    value: object = None


# ----------------------------------------------------------------------------- words


def phrase(obj: Obj) -> str:
    where = "in the center" if obj.position == "center" else f"on the {obj.position}"
    return f"a {obj.size} {obj.colour} {obj.shape} {where}"


def caption(scene: Scene) -> str:
    """E.g. 'a small red circle on the left and a large blue square on the right, on a white background'."""
    return fragment(scene, range(len(scene.objects)), background=True)


def fragment(scene: Scene, objects: Sequence[int], background: bool = False) -> str:
    """The caption's words for some of the scene: the objects at indices ``objects`` (listed left
    to right) and, with ``background``, the background clause. All objects and the background
    make the full :func:`caption`; one object alone is its phrase ('a small red circle on the
    left'), the background alone its clause ('on a white background'). Training fragments
    (:func:`sample_fragment`) that name objects never name the background, so the model can
    tell a partial caption from a whole one, which always ends with it.
    """
    parts = [phrase(scene.objects[i]) for i in sorted(objects)]
    body = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)
    if not background:
        if not body:
            raise ValueError("a fragment names at least one object or the background")
        return body
    clause = f"on a {scene.background} background"
    return f"{body}, {clause}" if body else clause


def sample_fragment(scene: Scene, rng: np.random.Generator,
                    partial: float = 1.0) -> tuple[tuple[int, ...], bool]:
    """What a training caption names, as :func:`fragment`'s (objects, background): with
    probability ``partial`` a partial caption, uniform over the ``2 ** n`` choices (any non-empty
    set of objects without the background, or the background alone), else the whole scene.
    ``partial`` 0 draws nothing from ``rng``."""
    n = len(scene.objects)
    if not partial or (partial < 1 and rng.random() >= partial):
        return tuple(range(n)), True
    k = int(rng.integers(2 ** n))
    if k == 0:
        return (), True
    return tuple(i for i in range(n) if k >> i & 1), False


def vocabulary() -> list[str]:
    """Every word any caption can contain (punctuation excluded), in a fixed order."""
    fixed = ["a", "on", "the", "in", "and", "background"]
    words = fixed + list(SIZES) + list(COLOURS) + list(SHAPES) + list(POSITIONS) + list(ALL_BACKGROUNDS)
    return list(dict.fromkeys(words))


def words(text: str) -> list[str]:
    """Caption words as the tokenizer sees them (commas are words of their own)."""
    return text.replace(",", " , ").split()


def word_swap(source: str, target: str) -> list[tuple[int, str, str]]:
    """Word positions (indices into ``words``) where two equal-length captions differ.

    Colour, shape, size and background edits differ in exactly one word; a
    position edit may differ in two ('on the left' -> 'in the center'). Returns
    [] when the word counts differ (add/remove), which is not a word swap.
    Items are (index, old word, new word).
    """
    a, b = words(source), words(target)
    if len(a) != len(b):
        return []
    return [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y]


# ----------------------------------------------------------------------------- sampling


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, screens: float = 0.0) -> Scene:
    """A random scene: 1-3 objects in distinct slots, listed left to right; its background is a
    screen (SCREENS) with probability ``screens``, else one of BACKGROUNDS (``screens`` 0 draws
    exactly what the world drew before screens existed)."""
    if not 0 <= screens <= 1:
        raise ValueError(f"screens is a share between 0 and 1, got {screens}")
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if screens and rng.random() < screens:
        background = str(rng.choice(list(SCREENS)))
    else:
        background = str(rng.choice(list(BACKGROUNDS)))
    slots = sorted(rng.choice(len(POSITIONS), size=n, replace=False))
    objs = []
    for s in slots:
        colour = str(rng.choice([c for c in COLOURS if c != background]))
        objs.append(Obj(str(rng.choice(SHAPES)), colour, POSITIONS[s], str(rng.choice(SIZES))))
    return Scene(tuple(objs), background, int(rng.integers(0, 2**31 - 1)))


def _free_positions(scene: Scene) -> list[str]:
    used = {o.position for o in scene.objects}
    return [p for p in POSITIONS if p not in used]


def possible_kinds(scene: Scene) -> list[str]:
    kinds = ["colour", "shape", "size", "background"]
    if _free_positions(scene):
        kinds += ["position", "add"]
    if len(scene.objects) > 1:
        kinds.append("remove")
    return kinds


def sample_edit(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> Edit:
    """A random valid edit of ``scene`` (of ``kind`` if given); a background edit picks one of the
    classic BACKGROUNDS, from a screen scene too."""
    kinds = possible_kinds(scene)
    kind = str(rng.choice(kinds)) if kind is None else kind
    if kind not in kinds:
        raise ValueError(f"edit kind {kind!r} is not possible on this scene; possible: {kinds}")
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    pick = lambda options: str(rng.choice(options))  # noqa: E731
    if kind == "colour":
        return Edit(kind, i, pick([c for c in COLOURS if c not in (obj.colour, scene.background)]))
    if kind == "shape":
        return Edit(kind, i, pick([s for s in SHAPES if s != obj.shape]))
    if kind == "size":
        return Edit(kind, i, "large" if obj.size == "small" else "small")
    if kind == "position":
        return Edit(kind, i, pick(_free_positions(scene)))
    if kind == "background":
        taken = {o.colour for o in scene.objects} | {scene.background}
        return Edit(kind, -1, pick([b for b in BACKGROUNDS if b not in taken]))
    if kind == "add":
        colour = pick([c for c in COLOURS if c != scene.background])
        new = Obj(pick(SHAPES), colour, pick(_free_positions(scene)), pick(SIZES))
        return Edit(kind, len(scene.objects), new)
    return Edit("remove", i)


def apply(scene: Scene, edit: Edit) -> Scene:
    """The exact target scene (same seed, so untouched pixels render identically)."""
    objs = list(scene.objects)
    k = edit.kind
    if k in ("colour", "shape", "position", "size"):
        field = {"colour": "colour", "shape": "shape", "position": "position", "size": "size"}[k]
        objs[edit.index] = replace(objs[edit.index], **{field: edit.value})
        if k == "position" and sum(o.position == edit.value for o in objs) > 1:
            raise ValueError(f"position {edit.value!r} is already taken")
        if k == "colour" and edit.value == scene.background:
            raise ValueError("an object cannot take the background colour")
        return replace(scene, objects=tuple(objs))
    if k == "background":
        if edit.value not in ALL_BACKGROUNDS:
            raise ValueError(f"unknown background {edit.value!r}; choose one of {list(ALL_BACKGROUNDS)}")
        if any(o.colour == edit.value for o in objs):
            raise ValueError("the background cannot take an object's colour")
        return replace(scene, background=str(edit.value))
    if k == "add":
        if not isinstance(edit.value, Obj) or edit.value.position not in _free_positions(scene):
            raise ValueError("add needs an Obj in a free position")
        if edit.value.colour == scene.background:
            raise ValueError("an object cannot take the background colour")
        return replace(scene, objects=tuple(objs + [edit.value]))
    if k == "remove":
        del objs[edit.index]
        return replace(scene, objects=tuple(objs))
    raise ValueError(f"unknown edit kind {k!r}; choose one of {EDIT_KINDS}")


def edit_prompt(scene: Scene, edit: Edit) -> str:
    """The caption of the edited scene (the target prompt)."""
    return caption(apply(scene, edit))


# ----------------------------------------------------------------------------- rendering


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """Point-in-shape test on offsets from the object centre (y grows downwards)."""
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def coverage(obj: Obj) -> np.ndarray:
    """Anti-aliased coverage of one object in [0, 1], float32 [64, 64] (read-only, cached)."""
    return _coverage(obj.shape, obj.position, obj.size)


@lru_cache(maxsize=None)
def _coverage(shape: str, position: str, size: str) -> np.ndarray:
    obj = Obj(shape, "", position, size)  # geometry does not depend on colour
    n = SIZE * _SUPER
    c = (np.arange(n, dtype=np.float32) + 0.5) / _SUPER  # supersample centres in pixel units
    dx = c[None, :] - CENTER_X[obj.position]  # [n, n]
    dy = c[:, None] - CENTER_Y
    inside = _inside(obj.shape, dx, dy, HALF[obj.size]).astype(np.float32)
    cov = inside.reshape(SIZE, _SUPER, SIZE, _SUPER).mean(axis=(1, 3))  # [64, 64]
    cov.setflags(write=False)
    return cov


def _shading(obj: Obj) -> np.ndarray:
    """Soft radial light from the upper left: brightness factor in ~[0.9, 1.06], [64, 64]."""
    h = HALF[obj.size]
    c = np.arange(SIZE, dtype=np.float32) + 0.5
    lx, ly = CENTER_X[obj.position] - 0.35 * h, CENTER_Y - 0.35 * h
    d2 = ((c[None, :] - lx) ** 2 + (c[:, None] - ly) ** 2) / (1.35 * h) ** 2
    return 1.06 - 0.16 * np.minimum(d2, 1.0)


def _texture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seed-only texture: a unit linear gradient [64, 64] and a noise field [64, 64, 3]."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi)
    c = (np.arange(SIZE, dtype=np.float32) + 0.5) / SIZE - 0.5
    grad = (np.cos(angle) * c[None, :] + np.sin(angle) * c[:, None]) / 0.7071  # in [-1, 1]
    noise = rng.normal(0.0, 2.5, size=(SIZE, SIZE, 3)).astype(np.float32)
    return grad.astype(np.float32), noise


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 [64, 64, 3]."""
    grad, noise = _texture(scene.seed)
    base = np.asarray(ALL_BACKGROUNDS[scene.background], np.float32)
    img = base[None, None, :] * (1.0 + 0.05 * grad[..., None])  # [64, 64, 3] gentle gradient
    for obj in scene.objects:
        cov = coverage(obj)[..., None]  # [64, 64, 1]
        col = np.asarray(COLOURS[obj.colour], np.float32)[None, None, :] * _shading(obj)[..., None]
        img = img * (1.0 - cov) + col * cov
    return np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)


def render_masks(scene: Scene) -> np.ndarray:
    """Per-object masks (coverage >= 1/2), bool [n_obj, 64, 64]."""
    if not scene.objects:
        return np.zeros((0, SIZE, SIZE), bool)
    return np.stack([coverage(o) >= 0.5 for o in scene.objects])


def footprint(obj: Obj) -> np.ndarray:
    """Every pixel the object touches at all (coverage > 0), bool [64, 64]."""
    return coverage(obj) > 0
