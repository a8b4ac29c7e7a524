"""The editing methods by name and the inversion each edits by default (no torch import: the CLI's
parser reads it). Their programs are registered in :mod:`engine.editing`."""

from __future__ import annotations

# The inversion each edit method edits unless a model's recipes (ModelCard.inversion_for) say otherwise.
DEFAULT_INVERSION = {"p2p": "ddim", "ledits++": "ledits++", "ddim": "ddim", "ddpm": "ddpm", "pnp": "ddim",
                     "masactrl": "ddim", "null-text": "null-text",
                     "pix2pix-zero": "pix2pix-zero", "imagic": "imagic"}


def inversion_for(method: str, card=None) -> str:
    """The inversion method an edit with ``method`` starts from: the model card's choice, else
    the method's default."""
    chosen = getattr(card, "inversion_for", None) or {}
    if method not in DEFAULT_INVERSION:
        raise ValueError(f"unknown edit method {method!r}; choose one of {', '.join(sorted(DEFAULT_INVERSION))}")
    return chosen.get(method, DEFAULT_INVERSION[method])
