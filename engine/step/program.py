"""Programs: what a request contributes to the one loop (engine.step.loop).

A method never writes a denoising loop. It builds a :class:`Program`, which answers, at
its current step:

* ``cond()``   -- its model rows' conditioning (a :class:`RowCond` from the Denoiser);
* ``model_input()`` -- the rows' latents and per-row timesteps (or None: no rows this step);
* ``plan()``   -- attention instructions over its own rows (indices from 0), or None;
* ``combine(out)`` -- how the model outputs of its rows become one prediction per
  sample (classifier-free guidance, SEGA, ...);
* ``advance(pred)`` -- the sampler update and whatever follows it (Prompt-to-Prompt's
  local blend and source overwrite, an inversion recording its trajectory), then the
  move to the next step.

The loop concatenates the rows of every live program, makes one model call, hands each
program its slice and lets it advance; ``done`` programs leave and new ones may join
between steps. Step math must stay capturable: tensor ops only, no ``.item()`` and no
Python branching on tensor values (branching on the host step index is fine).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from ..sampling.front import randn
from ..sampling.samplers import Sampler, SamplerState
from .denoiser import RowCond
from .guidance import Guidance


class Program:
    """Base of every program; see the module docstring for the protocol."""

    denoiser = None  # the Denoiser whose model this program's rows need
    matte = None  # a chroma key the façade removes from the decoded result (RGBA output), or None
    image_prompt = None  # the image prompt an inversion is conditioned on (the façade records it), or None

    def cond(self) -> RowCond:
        raise NotImplementedError

    def model_input(self) -> tuple[Tensor, Tensor] | None:
        """The rows' latents and timesteps, or None: no model rows this step (the loop then calls
        ``advance(None)``: an optimisation stage's iteration runs in its hook)."""
        raise NotImplementedError

    def model_rows(self) -> int:
        """Model rows this program runs per step (what a loop or a server budgets)."""
        return len(self.cond())

    def plan(self):
        return None

    def combine(self, out: Tensor) -> Tensor:
        return out

    def advance(self, pred: Tensor) -> None:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        raise NotImplementedError

    @property
    def steps_left(self) -> int:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError

    def group_key(self, x: Tensor) -> tuple:
        """Rows with equal keys can share one model call: same model and latent shape,
        conditioning of the same form (latent dtypes may differ: the model casts its input)."""
        return (self.denoiser.key, tuple(x.shape[1:]), self.cond().signature())


def drawn_noise(generator) -> Callable:
    """Noise as `sample` draws it: after the model call, in the prediction's dtype (or the
    sampler's), from ``generator`` -- so a seed gives diffusers' images."""

    def fn(smp: Sampler, i: int, pred: Tensor) -> Tensor:
        return randn(pred.shape, generator, pred.device, smp.noise_dtype or pred.dtype)

    return fn


def stored_noise(maps: Tensor, first: int, copies: int = 1) -> Callable:
    """Noise from stored maps [S', B, ...]: maps[i - first] at sampler step i (edit-friendly
    DDPM and LEDITS++ replays), repeated ``copies`` times over the rows (the same maps drive
    a source and an edit branch)."""

    def fn(smp: Sampler, i: int, pred: Tensor) -> Tensor:
        z = maps[i - first]  # [B, C, h, w]
        return z if copies == 1 else z.repeat(copies, 1, 1, 1)

    return fn


def per_step_rows(denoiser, g: Guidance, unconds: list, height, width, **size_kw) -> list[RowCond]:
    """The model rows of ``g`` at each step, its unconditional rows replaced by ``unconds[k]``
    ([B', ...], tiled over the guidance's B unconditional rows: both branches of an edit)."""
    if g is None or not g.guided:
        raise ValueError("per-step unconditional embeddings need classifier-free guidance (guidance_scale > 1)")
    n = len(g.uncond)
    out = []
    for u in unconds:
        if n % len(u):
            raise ValueError(f"{len(u)} per-step unconditional embeddings for {n} unconditional rows")
        u = u.to(g.uncond.context.device, g.uncond.context.dtype)
        out.append(denoiser.condition_guidance(replace(g, uncond=u.tile(n // len(u))), height, width, **size_kw))
    return out


class SamplerProgram(Program):
    """A sampler run over B sample rows from step ``start`` to ``end``: generation, DDIM
    inversion, DDIM / DDPM regeneration, and the base of the editing programs.

    The model rows are ``copies`` copies of the sample rows (2 with guidance: [uncond,
    cond]); ``combine`` is the guidance's. ``callback`` gets dict(i, t, x, x0) after each step.
    ``uncond_steps``: one unconditional :class:`~engine.prompts.Conditioning` [B, ...] per step
    from ``start`` (null-text inversion's optimised embeddings): the unconditional rows then
    change every step (their rows are built once, here).
    ``early``: (k, rows): the model rows of the steps before step k, ``rows`` (the program's own)
    from k on (PuLID's ``start_step``: the identity joins the prompt from step k).
    """

    def __init__(self, denoiser, guidance: Guidance | None, x: Tensor, sampler: Sampler, *, rows: RowCond | None = None,
                 height: int | None = None, width: int | None = None, start: int = 0, end: int | None = None,
                 noise: Callable | None = None, state: SamplerState | None = None, callback=None,
                 uncond_steps: list | None = None, early: tuple[int, RowCond] | None = None, **size_kw):
        self.denoiser, self.g, self.sampler = denoiser, guidance, sampler
        self.x = x  # [B, C, h, w] float32: the loop keeps latents in float32
        self.i, self.end = start, len(sampler) if end is None else end
        self.noise, self.callback = noise, callback
        self.state = sampler.init_state(x) if state is None else state
        if rows is None:
            rows = denoiser.condition_guidance(guidance, height, width, **size_kw)
        self.rows = rows
        self.copies = len(rows) // x.shape[0]
        self.scale = None if guidance is None or not guidance.guided else self._scale(guidance)
        self.step_rows, self._rows_from = None, start
        if uncond_steps is not None:
            self.step_rows = per_step_rows(denoiser, guidance, uncond_steps, height, width, **size_kw)
        self.early = early
        if early is not None and (uncond_steps is not None or len(early[1]) != len(rows)):
            raise ValueError("early rows must match the program's rows in number, and exclude per-step "
                             "unconditional embeddings")

    @staticmethod
    def _scale(g: Guidance):
        return g.scale if not isinstance(g.scale, Tensor) else g.scale.to(torch.float32)

    # ---- the protocol -------------------------------------------------------------------
    def cond(self) -> RowCond:
        if self.early is not None and self.i < self.early[0]:
            return self.early[1]
        return self.rows if self.step_rows is None else self.step_rows[min(self.i - self._rows_from, len(self.step_rows) - 1)]

    def model_input(self):
        x_in = self.sampler.scale_model_input(self.x, self.i)  # [B, C, h, w]
        x_rows = x_in if self.copies == 1 else torch.cat([x_in] * self.copies)  # [R, C, h, w]
        return x_rows, self.sampler.timesteps[self.i].expand(x_rows.shape[0])  # [R]

    def combine(self, out):
        return self.g.combine(out, self.scale) if self.g is not None else out

    def advance(self, pred):
        i = self.i
        noise = self.noise(self.sampler, i, pred) if self.noise is not None and self.sampler.needs_noise(i) else None
        self.x, self.state = self.sampler.step(i, self.x, pred, self.state, noise)
        self.after_update(i)
        if self.callback is not None:
            self.callback(self.report(i))
        self.i += 1

    def after_update(self, i: int) -> None:
        """What follows the sampler update at step i (none here)."""

    def report(self, i: int) -> dict:
        return dict(i=i, t=self.sampler.timesteps[i].expand(self.x.shape[0]), x=self.x, x0=self.state.x0)

    @property
    def done(self) -> bool:
        return self.i >= self.end

    @property
    def steps_left(self) -> int:
        return max(self.end - self.i, 0)

    def result(self):
        return self.x
