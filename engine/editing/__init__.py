"""Editing methods: invert a real image, then regenerate it under an edit.

Each method is a pair of plain functions registered here by name:
``invert(pipe, image, prompt, **params) -> Inversion`` and
``edit(pipe, inv, target_prompt, **params) -> latents [B, C, h, w]``.
All of them drive the same batched step (one UNet call per timestep for every
branch, rows with their own timesteps and attention instructions).
"""

from __future__ import annotations

import importlib

from .inversion import Inversion

# name -> (module, function); modules are imported on first use.
INVERTERS = {
    "ddim": ("engine.editing.ddim", "invert"),
    "ddpm": ("engine.editing.ddpm", "invert"),
    "ledits++": ("engine.editing.ledits", "invert"),
}
EDITORS = {
    "ddim": ("engine.editing.ddim", "edit"),
    "ddpm": ("engine.editing.ddpm", "edit"),
    "ledits++": ("engine.editing.ledits", "edit"),
    "p2p": ("engine.editing.p2p", "edit"),
}


def _lookup(table: dict, method: str, what: str):
    if method not in table:
        raise ValueError(f"unknown {what} method {method!r}; choose one of {', '.join(sorted(table))}")
    module, fn = table[method]
    return getattr(importlib.import_module(module), fn)


def inverter(method: str):
    return _lookup(INVERTERS, method, "inversion")


def editor(method: str):
    return _lookup(EDITORS, method, "edit")


__all__ = ["Inversion", "INVERTERS", "EDITORS", "inverter", "editor"]
