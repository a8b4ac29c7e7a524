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
  ledits++  LEDITS++ (Brack et al. 2024): DPM-Solver++ SDE inversion, SEGA concepts that are
            the captions' phrases for what changes ("a small blue circle on the left"),
            intersect (attention and guidance) mask; edit scale 5 and threshold 0.5 (see EDIT).
  pnp       Plug-and-Play (Tumanyan et al. 2023) on the DDIM inversion: decoder ResNet
            features for 80% of the steps, self-attention queries/keys for 50%.
  masactrl  MasaCtrl (Cao et al. 2023) on the DDIM inversion: the edit's self-attention
            reads the source's keys/values from step 4, in the decoder's last layers.
  null-text null-text inversion (Mokady et al. 2023) for guidance 7.5 (Adam lr 2e-3, see
            INVERT), edited with Prompt-to-Prompt as the paper (source branch denoising with
            the optimised unconditional embeddings; P2P's windows and local blend).
  pix2pix-zero  pix2pix-zero (Parmar et al. 2023): regularised DDIM inversion; the edit
            direction is the target caption's embedding minus the source's (the word-swap
            direction for attribute edits); cross-attention guidance 0.1, guidance 1.5 (EDIT).
  imagic    Imagic (Kawar et al. 2023): embedding optimisation and full UNet fine-tuning for
            the target caption, generation at alpha 1.5. The paper's 500 + 1000 iterations at
            lr 1e-3 / 2e-6 are ~3 min per image on this CPU; 200 + 200 at lr 1e-3 / 2e-5 reach
            the same regime on this small model (see EDIT).

The bundled Shapes DiT (``engine.load("shapes-dit")``, FLUX architecture) has its own recipes
(:data:`DIT_METHODS`), 28 steps as FLUX, classifier-free guidance ``DIT_GUIDANCE``:

  flow      plain flow inversion (the reverse Euler flow), edit = generation from its noise.
  rf-inversion  RF-Inversion (Rout et al. 2024): controlled inversion gamma 0.5, controlled
            edit eta 0.9 for the first 25% of the steps, as the reference code.

A :class:`Change` says what the edit touches in words (the prompts, P2P's local-blend
words, LEDITS++'s concepts); ``engine.shapes.world`` edits convert with :func:`change_of`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.shapes import world

METHODS = ("ddim", "ddpm", "p2p", "ledits++", "pnp", "masactrl", "null-text", "pix2pix-zero", "imagic")
STEPS = 30
DIT_METHODS = ("flow", "rf-inversion")
DIT_STEPS = 28
DIT_GUIDANCE = 2.0  # classifier-free guidance of the Shapes DiT's generations and edits (40 prompts: 95% at 2, 90% at 4 and 6)

INVERT = {
    "ddim": dict(method="ddim", steps=STEPS, guidance_scale=1.0),
    "ddpm": dict(method="ddpm", steps=STEPS, guidance_scale=3.5, skip=0.33, seed=0),
    "p2p": dict(method="ddpm", steps=STEPS, guidance_scale=3.5, skip=0.33, seed=0),
    # Unconditional inversion (diffusers' default empty source prompt): LEDITS++ replays the
    # unconditional branch, so only then is the reconstruction exact.
    "ledits++": dict(method="ledits++", prompt="", steps=STEPS, skip=0.15, seed=0),
    # Plug-and-Play and MasaCtrl regenerate a DDIM inversion (the reference inverts PnP with an
    # empty prompt; ours keeps the caption: the source row then replays what it inverted).
    "pnp": dict(method="ddim", steps=STEPS, guidance_scale=1.0),
    "masactrl": dict(method="ddim", steps=STEPS, guidance_scale=1.0),
    # lr 2e-3, not the paper's 1e-2: on this model's 128-wide text embedding the paper's steps pull
    # the unconditional embedding towards the source caption, and guided edits then overshoot away
    # from it (8 colour swaps, P2P edit: 3/8 at 1e-2, 7/8 at 2e-3; a plain DDIM edit at 7.5 from
    # the same inversion: 8/8 with the plain embedding, 3/8 with the 1e-2 ones).
    "null-text": dict(method="null-text", steps=STEPS, guidance_scale=7.5, lr=2e-3),
    "pix2pix-zero": dict(method="pix2pix-zero", steps=STEPS, seed=0),
    # Imagic optimises for the edit's own text: its "inversion" is made per target caption.
    "imagic": dict(method="imagic", prompt="{target}", embed_steps=200, tune_steps=200, tune_lr=2e-5, seed=0),
    "flow": dict(method="flow", steps=DIT_STEPS, guidance_scale=1.0),
    "rf-inversion": dict(method="rf-inversion", steps=DIT_STEPS, gamma=0.5, seed=0),
}
# The edit method of recipes that edit with another method than their name (null-text: P2P).
EDIT_METHOD = {"null-text": "p2p"}
# How a recipe regenerates the source when that is not its inversion's plain replay.
RECONSTRUCT = {"imagic": dict(alpha=0.0, steps=STEPS, seed=0)}
EDIT = {
    "ddim": dict(guidance_scale=1.0),
    "ddpm": dict(guidance_scale=15.0),
    "p2p": dict(guidance_scale=7.5, cross_replace_steps=0.8, self_replace_steps=0.4, blend_threshold=0.3,
                source="inversion"),
    # Concepts are phrases of the captions (Change.concepts); the model learned such fragments in
    # training (20% of captions). Threshold 0.5 keeps half of the 4x4 attention map (an object is
    # one or two of its columns); the paper's 0.9 kept too little of a large object. On the first
    # 20 colour swaps of ShapesEdit (a sweep run while tuning): towards-only concepts 95% at
    # scale 5 (bg 30.5 dB), 80% at 2.5, 55% at 7.5 / 0.7, 20% at 10 / 0.9; towards + away 60% at
    # 2.5, 45% at 5 (the away term overshoots: blue -> purple came out white); whole captions as
    # concepts 50%. Shape swaps (10): towards-only 100% at 5; backgrounds 80%.
    "ledits++": dict(edit_guidance_scale=5.0, edit_threshold=0.5, use_intersect_mask=True),
    # The references' defaults (PnP: attention 0.5, features 0.8; MasaCtrl: from step 4, from the
    # self-attention layer at 10/16 of the UNet, here 6 of 10); guidance 7.5 as both papers.
    "pnp": dict(guidance_scale=7.5, pnp_attn_t=0.5, pnp_f_t=0.8),
    "masactrl": dict(guidance_scale=7.5, start_step=4),
    "null-text": dict(guidance_scale=7.5, cross_replace_steps=0.8, self_replace_steps=0.4, blend_threshold=0.3),
    # Guidance 1.5 against the caption, not the official 5: the caption-difference direction scaled 5x
    # overshoots on this model (blue -> purple came out white, -> orange yellow). 8 colour swaps:
    # 4/8 at 5, 5/8 at 3, 7/8 at 2, 8/8 at 1.5 (12/12 of ShapesEdit's first 12 at 1.5).
    "pix2pix-zero": dict(guidance_scale=1.5, cross_attention_guidance=0.1),
    # alpha 1.5: the middle of the paper's 1-2 (on 2 colour swaps while tuning: alpha 1 kept the old
    # colour once, 1.5 and 2 changed both with the same background).
    "imagic": dict(alpha=1.5, guidance_scale=7.5, steps=STEPS, seed=0),
    "flow": dict(guidance_scale=DIT_GUIDANCE),
    "rf-inversion": dict(guidance_scale=DIT_GUIDANCE, eta=0.9, start=0.0, stop=0.25),
}
# The parameter each method's fidelity-editability sweep varies (benchmark plot).
SWEEP = {"p2p": ("cross_replace_steps", (0.2, 0.4, 0.6, 0.8, 1.0)),
         "pix2pix-zero": ("cross_attention_guidance", (0.0, 0.05, 0.1, 0.2, 0.4)),
         "pnp": ("pnp_f_t", (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)),
         "ledits++": ("edit_guidance_scale", (1.5, 2.5, 5.0, 7.5, 10.0)),
         "rf-inversion": ("stop", (0.0, 0.1, 0.25, 0.4, 0.6))}


CARD_NOTES = ("Editing defaults of the bundled Shapes model, written from engine/shapes/recipes.py "
              "(where each choice is explained); pipe.invert / pipe.edit and the CLI start from them.")


def methods_for(pipe) -> tuple[str, ...]:
    """The recipes that apply to a Shapes model: the DiT's for FLUX-architecture models."""
    return DIT_METHODS if getattr(pipe, "arch", None) == "flux" else METHODS


# The bundled model's IP-Adapter ("plus", trained by engine.shapes.train_ip), relative to its folder:
# ``pipe.load_ip_adapter()`` attaches it; Tight Inversion reads the image through it.
IP_ADAPTER = "ip_adapter/ip-adapter-plus_shapes.safetensors"


def model_card(methods: tuple[str, ...] = METHODS, generate: dict | None = None, ip_adapter: bool = True) -> dict:
    """The model folder's ``overpaint.json`` (:class:`engine.loading.card.ModelCard`): the
    recipes of ``methods`` as per-method defaults, generation defaults, the world's vocabulary
    and, with ``ip_adapter``, where the UNet model's IP-Adapter lies (:data:`IP_ADAPTER`)."""
    from engine.loading.card import FORMAT

    invert: dict[str, dict] = {}
    for m in methods:
        kw = {k: v for k, v in INVERT[m].items() if k not in ("method", "prompt")}  # prompts are the user's
        if invert.setdefault(INVERT[m]["method"], kw) != kw:
            raise ValueError(f"two recipes invert with {INVERT[m]['method']!r} differently; a card holds one")
    edit = {m: EDIT[m] for m in methods if EDIT_METHOD.get(m, m) == m}  # keyed by the edit method
    card = {"format": FORMAT, "notes": CARD_NOTES, "invert": invert, "edit": edit,
            "inversion_for": {m: INVERT[m]["method"] for m in methods if INVERT[m]["method"] != m},
            "vocabulary": world.vocabulary()}
    if generate:
        card["generate"] = generate
    if methods == METHODS and ip_adapter:
        card["ip_adapter"] = IP_ADAPTER
    return card


def dit_card() -> dict:
    return model_card(DIT_METHODS, generate=dict(steps=DIT_STEPS, guidance_scale=DIT_GUIDANCE))


def write_card(folder: str | Path, card: dict | None = None) -> Path:
    path = Path(folder) / "overpaint.json"
    path.write_text(json.dumps(card or model_card(), indent=2) + "\n")
    return path


@dataclass
class Change:
    """An edit in words: the source and target captions, the words that name the region (P2P),
    and the LEDITS++ concepts: phrases to guide towards and away from."""

    source_prompt: str
    target_prompt: str
    blend: tuple[list[str], list[str]] | None = None  # P2P local-blend words (source, target)
    concepts: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # LEDITS++ (towards, away)


def change_of(scene: world.Scene, e: world.Edit) -> Change:
    """The :class:`Change` of a world edit. LEDITS++ concepts are the captions' own phrases:
    towards the new object (or background clause), and away from the old object only where it
    must disappear (position, remove). Steering away from an object that is only recoloured or
    reshaped in place pushed past the target (blue -> purple came out white); see EDIT."""
    target = world.apply(scene, e)
    src, tgt = world.caption(scene), world.caption(target)
    if e.kind == "background":
        return Change(src, tgt, concepts=((world.fragment(target, (), True),), ()))
    new_obj = e.value if e.kind == "add" else None if e.kind == "remove" else target.objects[e.index]
    towards = () if new_obj is None else (world.phrase(new_obj),)
    away = (world.phrase(scene.objects[e.index]),) if e.kind in ("position", "remove") else ()
    blend = None
    if e.kind in ("colour", "shape", "size"):  # one object changes in place: blend on its words
        old, new = scene.objects[e.index], target.objects[e.index]
        attr = "size" if e.kind == "size" else "colour"
        blend = ([getattr(old, attr), old.shape], [getattr(new, attr), new.shape])
    return Change(src, tgt, blend, (towards, away))


def inversion_prompt(method: str, change: Change) -> str:
    """The prompt ``method`` inverts with: the source caption, or what its recipe says
    ("" for LEDITS++, the target caption for Imagic)."""
    return INVERT[method].get("prompt", "{source}").format(source=change.source_prompt, target=change.target_prompt)


def invert(pipe, image, change: Change | str, method: str, **overrides):
    """Invert ``image`` for ``method`` (an :class:`engine.editing.Inversion`); ``change`` (or the
    source caption) gives the prompt."""
    if isinstance(change, str):
        change = Change(change, change)
    kw = {**INVERT[method], **overrides}
    kw.pop("prompt", None)
    return pipe.invert(image, inversion_prompt(method, change), progress=False, **kw)


def reconstruct(pipe, inv, method: str):
    """Regenerate the source (no edit): images [B, 3, H, W] in [0, 1]."""
    if method == "ledits++":  # no concepts: the unconditional replay of the stored noise
        return pipe.edit(inv, "ledits++", output_type="pt", progress=False)
    return pipe.edit(inv, INVERT[method]["method"], None, output_type="pt", progress=False,
                     **RECONSTRUCT.get(method, {}))


def edit_request(inv, method: str, change: Change, **overrides) -> dict:
    """The keyword arguments of ``pipe.edit`` (one request of ``pipe.edit_many``) that apply
    ``change`` with ``method``."""
    kw = {**EDIT[method], **overrides}
    if method == "ledits++":
        towards, away = change.concepts
        if not towards and not away:
            raise ValueError("LEDITS++ needs at least one concept (Change.concepts: towards, away)")
        return dict(inv=inv, method="ledits++", editing_prompt=[*towards, *away],
                    reverse_editing_direction=[False] * len(towards) + [True] * len(away), **kw)
    edit_method = EDIT_METHOD.get(method, method)
    if edit_method == "p2p" and change.blend is not None and "local_blend_words" not in kw:
        kw["local_blend_words"] = change.blend
    return dict(inv=inv, method=edit_method, target_prompt=change.target_prompt, **kw)


def edit(pipe, inv, method: str, change: Change, **overrides):
    """Apply ``change`` with ``method``: images [B, 3, H, W] in [0, 1]."""
    request = edit_request(inv, method, change, **overrides)  # refuses a bad change before any work
    return pipe.edit_many([request], output_type="pt")[0]
