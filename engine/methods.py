"""The editing methods by name and the inversion each edits by default (no torch import: the CLI's
parser reads it). Their programs are registered in :mod:`engine.editing`."""

from __future__ import annotations

# The inversion each edit method edits unless a model's recipes (ModelCard.inversion_for) say otherwise.
DEFAULT_INVERSION = {"p2p": "ddim", "ledits++": "ledits++", "ddim": "ddim", "ddpm": "ddpm", "pnp": "ddim",
                     "masactrl": "ddim", "null-text": "null-text", "pix2pix-zero": "pix2pix-zero", "imagic": "imagic",
                     "flow": "flow", "rf-inversion": "rf-inversion", "renoise": "renoise"}

# Inversions that draw no noise: an edit from one of them is the same whatever the seed.
UNSEEDED_INVERSIONS = frozenset({"ddim", "null-text", "flow"})

# The model family each method runs on ("unet": SD / SDXL; "flux": FLUX.1 and the Shapes DiT).
FLUX_METHODS = frozenset({"flow", "rf-inversion"})


def family(method: str) -> str:
    return "flux" if method in FLUX_METHODS else "unet"


def check_family(method: str, model_family: str, what: str = "edit") -> None:
    """A clear error for a method of another model family (before any work is done)."""
    if not isinstance(method, str):
        raise TypeError(f"{what} method must be a string such as 'ddim', got {type(method).__name__}")
    if method in DEFAULT_INVERSION and family(method) != model_family:
        names = sorted(m for m in DEFAULT_INVERSION if family(m) == model_family)
        kinds = {"flux": "FLUX", "unet": "UNet (SD, SDXL)"}
        raise ValueError(f"{what} method {method!r} runs on {kinds[family(method)]} models; this is a "
                         f"{kinds[model_family]} model: use one of {', '.join(names)}")

# Tight Inversion: inversion methods that take ``image_condition`` / ``image_scale`` (the image's own
# IP-Adapter tokens on UNets, its PuLID id tokens on FLUX, on the inversion's rows), and edit methods
# that read them again.
IMAGE_INVERSIONS = frozenset({"ddim", "ddpm", "ledits++", "renoise", "flow", "rf-inversion"})
IMAGE_EDITS = frozenset({"ddim", "ddpm", "ledits++", "p2p", "renoise", "flow", "rf-inversion"})

# Inversions made under the edit's own text rather than the source caption (Imagic optimises
# from the target's embedding and tunes the model for it).
INVERTS_TARGET = frozenset({"imagic"})
# Parameter names an edit request shares with inversions that belong to the edit for these
# methods (Imagic's inversion has no denoising steps; its edit is a generation that has).
EDIT_TAKES = {"imagic": ("steps",)}
# ... and those both take (Imagic: the seed of its training draws and of its generation).
EDIT_SHARES = {"imagic": ("seed",)}

# Edit parameters that stand in for a target prompt (pix2pix-zero's edit direction).
TARGET_FREE = {"pix2pix-zero": ("direction",)}


def split_params(method: str, inv: dict, edit: dict) -> tuple[dict, dict]:
    """Hand the edit of ``method`` the shared names that are its own (see EDIT_TAKES, EDIT_SHARES)."""
    inv, edit = dict(inv), dict(edit)
    for k in EDIT_TAKES.get(method, ()):
        if k in inv:
            edit.setdefault(k, inv.pop(k))
    for k in EDIT_SHARES.get(method, ()):
        if k in inv:
            edit.setdefault(k, inv[k])
    return inv, edit


def inversion_prompt(method: str, source, target):
    """The prompt the inversion for an edit with ``method`` is made under."""
    return target if method in INVERTS_TARGET else source


def needs_target(method: str, edit_params: dict) -> bool:
    """Whether an edit with these parameters needs a target prompt."""
    return method != "ledits++" and not any(k in edit_params for k in TARGET_FREE.get(method, ()))


def inversion_for(method: str, card=None) -> str:
    """The inversion method an edit with ``method`` starts from: the model card's choice, else
    the method's default."""
    chosen = getattr(card, "inversion_for", None) or {}
    if method not in DEFAULT_INVERSION:
        raise ValueError(f"unknown edit method {method!r}; choose one of {', '.join(sorted(DEFAULT_INVERSION))}")
    return chosen.get(method, DEFAULT_INVERSION[method])
