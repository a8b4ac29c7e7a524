"""Editing methods: invert a real image, then regenerate it under an edit.

Each method is a program on the one loop (:mod:`engine.step`), built by functions
registered here by name: ``invert_program(pipe, image, prompt, **params)`` (its result an
:class:`Inversion`) and ``edit_program(pipe, inv, target_prompt, **params)`` (its result
latents [B, C, h, w]). ``invert`` / ``edit`` run one such program alone. Any number of
programs, of any methods, share one model call per step when run together
(``Pipeline.edit_many`` / ``invert_many``).
"""

from __future__ import annotations

import importlib

from ..methods import DEFAULT_INVERSION, inversion_for
from .inversion import Inversion

# name -> (module, function); the program builder is ``function + "_program"``; modules are imported on first use.
INVERTERS = {
    "ddim": ("engine.editing.ddim", "invert"),
    "ddpm": ("engine.editing.ddpm", "invert"),
    "ledits++": ("engine.editing.ledits", "invert"),
    "null-text": ("engine.editing.nulltext", "invert"),
    "pix2pix-zero": ("engine.editing.pix2pix_zero", "invert"),
    "imagic": ("engine.editing.imagic", "invert"),
    "flow": ("engine.editing.flow", "flow_invert"),
    "rf-inversion": ("engine.editing.flow", "invert"),
    "renoise": ("engine.editing.renoise", "invert"),
}
EDITORS = {
    "ddim": ("engine.editing.ddim", "edit"),
    "ddpm": ("engine.editing.ddpm", "edit"),
    "ledits++": ("engine.editing.ledits", "edit"),
    "p2p": ("engine.editing.p2p", "edit"),
    "pnp": ("engine.editing.pnp", "edit"),
    "masactrl": ("engine.editing.masactrl", "edit"),
    "null-text": ("engine.editing.nulltext", "edit"),
    "pix2pix-zero": ("engine.editing.pix2pix_zero", "edit"),
    "imagic": ("engine.editing.imagic", "edit"),
    "flow": ("engine.editing.flow", "flow_edit"),
    "rf-inversion": ("engine.editing.flow", "edit"),
    "renoise": ("engine.editing.ddim", "edit"),  # a ReNoise inversion replays with DDIM
}


def _lookup(table: dict, method: str, what: str):
    if method not in table:
        raise ValueError(f"unknown {what} method {method!r}; choose one of {', '.join(sorted(table))}")
    module, fn = table[method]
    return getattr(importlib.import_module(module), fn)


def inverter(method: str):
    """invert(pipe, image, prompt, **params) -> Inversion, run alone."""
    return _lookup(INVERTERS, method, "inversion")


def editor(method: str):
    """edit(pipe, inv, target_prompt, **params) -> latents, run alone."""
    return _lookup(EDITORS, method, "edit")


def inversion_program(method: str):
    """invert_program(pipe, image, prompt, **params) -> Program whose result is an Inversion."""
    return _lookup({k: (m, f + "_program") for k, (m, f) in INVERTERS.items()}, method, "inversion")


def edit_program(method: str):
    """edit_program(pipe, inv, target_prompt, **params) -> Program whose result is latents."""
    return _lookup({k: (m, f + "_program") for k, (m, f) in EDITORS.items()}, method, "edit")


__all__ = ["Inversion", "INVERTERS", "EDITORS", "DEFAULT_INVERSION", "inversion_for", "inverter", "editor", "inversion_program", "edit_program"]
