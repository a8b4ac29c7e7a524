"""Editing recipes for the Shapes model: each method's inversion and edit settings in one place.

The benchmark (``benchmarks/shapes_edit.py``) and the demo (``engine.shapes.demo``) both go
through :func:`invert`, :func:`reconstruct` and :func:`edit`, so the numbers reported are
for exactly the settings the demo uses. Settings follow the papers, scaled to this model's
64x64 images (fewer steps, as the CPU budget asks):

  ddim      DDIM inversion (guidance 1, as null-text inversion's starting point), edit =
            DDIM regeneration with the target prompt.
  ddpm      edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024): source
            guidance 3.5, target guidance 15 as the paper, the first ~1/3 of the steps skipped.
  p2p       Prompt-to-Prompt (Hertz et al. 2022) on the edit-friendly DDPM inversion (the
            DDPM-inversion paper's "P2P + ours"): cross-attention replaced for 80% of the
            steps, self-attention for 40%, local blending on the edited object's words.
  ledits++  LEDITS++ (Brack et al. 2024): DPM-Solver++ SDE inversion, one SEGA concept
            towards the target caption and one away from the source caption, intersect
            (attention and guidance) mask; edit scale 2.5 and threshold 0.5 (see EDIT).

A :class:`Change` says what the edit touches in words (the prompts, P2P's local-blend
words); ``engine.shapes.world`` edits convert with :func:`change_of`.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.shapes import world

METHODS = ("ddim", "ddpm", "p2p", "ledits++")
STEPS = 30

INVERT = {
    "ddim": dict(method="ddim", steps=STEPS, guidance_scale=1.0),
    "ddpm": dict(method="ddpm", steps=STEPS, guidance_scale=3.5, skip=0.33, seed=0),
    "p2p": dict(method="ddpm", steps=STEPS, guidance_scale=3.5, skip=0.33, seed=0),
    # Unconditional inversion (diffusers' default empty source prompt): LEDITS++ replays the
    # unconditional branch, so only then is the reconstruction exact.
    "ledits++": dict(method="ledits++", prompt="", steps=STEPS, skip=0.15, seed=0),
}
EDIT = {
    "ddim": dict(guidance_scale=1.0),
    "ddpm": dict(guidance_scale=15.0),
    "p2p": dict(guidance_scale=7.5, cross_replace_steps=0.8, self_replace_steps=0.4, blend_threshold=0.3,
                source="inversion"),
    # The concepts are whole captions: this model only ever saw whole captions, and its text
    # encoder says where an object is at the object's position word, so a fragment concept such
    # as "purple square" draws a new square in a default place. Scale and threshold are below
    # the paper's (5-15, 0.9): with caption concepts on 10 colour swaps, scale 5 and more
    # overshot the colour (blue -> white for "purple"), threshold 0.9 left the object half
    # edited; 20 swaps: 45% at 2.5 / 0.5 (bg 31.8 dB), 30% at 2.5 / 0.7, 40% at 1.5 / 0.5;
    # word concepts at the paper's 10 / 0.9: 5% (bg 21.8 dB).
    "ledits++": dict(edit_guidance_scale=2.5, edit_threshold=0.5, use_intersect_mask=True),
}
# The parameter each method's fidelity-editability sweep varies (benchmark plot).
SWEEP = {"p2p": ("cross_replace_steps", (0.2, 0.4, 0.6, 0.8, 1.0)),
         "ledits++": ("edit_guidance_scale", (1.5, 2.5, 3.5, 5.0, 10.0))}


@dataclass
class Change:
    """An edit in words: the source and target captions and the words that name the region."""

    source_prompt: str
    target_prompt: str
    blend: tuple[list[str], list[str]] | None = None  # P2P local-blend words (source, target)


def change_of(scene: world.Scene, e: world.Edit) -> Change:
    """The :class:`Change` of a world edit."""
    src, tgt = world.caption(scene), world.edit_prompt(scene, e)
    if e.kind in ("colour", "shape", "size"):  # one object changes in place: blend on its words
        old, new = scene.objects[e.index], world.apply(scene, e).objects[e.index]
        attr = "size" if e.kind == "size" else "colour"
        return Change(src, tgt, ([getattr(old, attr), old.shape], [getattr(new, attr), new.shape]))
    return Change(src, tgt)


def invert(pipe, image, source_prompt: str, method: str, **overrides):
    """Invert ``image`` for ``method`` (an :class:`engine.editing.Inversion`)."""
    kw = {**INVERT[method], **overrides}
    return pipe.invert(image, kw.pop("prompt", source_prompt), progress=False, **kw)


def reconstruct(pipe, inv, method: str):
    """Regenerate the source (no edit): images [B, 3, H, W] in [0, 1]."""
    if method == "ledits++":  # no concepts: the unconditional replay of the stored noise
        return pipe.edit(inv, "ledits++", output_type="pt", progress=False)
    return pipe.edit(inv, INVERT[method]["method"], None, output_type="pt", progress=False)


def edit(pipe, inv, method: str, change: Change, **overrides):
    """Apply ``change`` with ``method``: images [B, 3, H, W] in [0, 1]."""
    kw = {**EDIT[method], **overrides}
    if method == "ledits++":  # towards the target caption, away from the source caption
        return pipe.edit(inv, "ledits++", editing_prompt=[change.target_prompt, change.source_prompt],
                         reverse_editing_direction=[False, True], output_type="pt", progress=False, **kw)
    if method == "p2p":
        if change.blend is not None and "local_blend_words" not in kw:
            kw["local_blend_words"] = change.blend
        return pipe.edit(inv, "p2p", change.target_prompt, output_type="pt", progress=False, **kw)
    return pipe.edit(inv, method, change.target_prompt, output_type="pt", progress=False, **kw)
