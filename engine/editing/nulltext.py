"""Null-text inversion (Mokady et al. 2023, "Null-text Inversion for Editing Real Images using
Guided Diffusion Models"), for SD and SDXL.

DDIM inversion with the source prompt at guidance 1 gives a trajectory z*_T .. z*_0 that a
guided regeneration (w = 7.5) drifts away from. Null-text inversion keeps the model and the
prompt and optimises, per step, the unconditional ("null-text") embedding so that the guided
DDIM step from the current latent lands on the inversion's next one (Sec. 3.2):

    min_{∅_t} || z*_{t-1} - DDIM(z̄_t, ∅_t, C) ||²,   z̄_T = z*_T,  z̄_{t-1} = DDIM(z̄_t, ∅_t, C)

with ``inner_steps`` Adam steps per timestep (10, lr 1e-2·(1 − i/100)), stopping early when
the loss falls under ``early_stop`` + 2e-5·i, ∅_t starting from ∅_{t+1} (the official code).

One :class:`~engine.step.Chain` program of two stages: the DDIM inversion
(:mod:`engine.editing.ddim`), then :class:`NullTextPass` over the forward steps from z*_T,
whose model rows are the conditional ones (the loop's call at each step) and whose per-step
hook runs the optimisation (gradients w.r.t. the embedding only, in float32) and the
unconditional prediction with the optimised ∅_t, then the guided update. The
:class:`~engine.editing.Inversion` keeps ∅_t per step (extras ``null.context`` [S, B, L, D]
and, SDXL, ``null.pooled`` [S, B, P]: both text encoders' parts are optimised); plain DDIM,
Prompt-to-Prompt and MasaCtrl edits replay them (``SamplerProgram(uncond_steps=...)``).
"""

from __future__ import annotations

import torch

from ..prompts import Conditioning, as_list
from ..sampling import make_sampler
from ..step import Chain, Guidance, SamplerProgram
from . import ddim
from .common import run_one
from .inversion import Inversion
from .optim import default_checkpointing, detached, parameters, tensors, trainable


class NullTextPass(SamplerProgram):
    """The optimisation pass over a DDIM inversion ``inv``; its result is the null-text Inversion."""

    def __init__(self, pipe, inv: Inversion, null: Conditioning, guidance_scale: float, inner_steps: int,
                 early_stop: float, lr: float, checkpointing: bool, callback=None):
        s, dev = inv.settings, pipe.device
        forward = make_sampler("ddim", pipe.schedule, inv.steps, device=dev)
        g = Guidance(inv.source.to(dev, pipe.dtype), None, None)  # the loop runs the conditional rows
        super().__init__(pipe.denoiser, g, inv.latents[0].to(dev, torch.float32), forward, height=s["height"],
                         width=s["width"], callback=callback)
        self.inv, self.null, self.nulls = inv, null.to(dev, torch.float32), []
        self.start = null  # the plain ∅ (kept as the Inversion's ``uncond``)
        self.scale, self.inner, self.eps, self.lr, self.ckpt = guidance_scale, inner_steps, early_stop, lr, checkpointing
        self.inner_run = []  # inner steps taken at each step

    def advance(self, cond_pred):
        i, den = self.i, self.denoiser
        cond_pred = cond_pred.float()  # [B, C, h, w]
        self.null = self.optimise(i, cond_pred)
        self.nulls.append(self.null)
        unc = den(self.x, self._t(i), den.condition(self.null, *self._size())).float()
        super().advance(unc + self.scale * (cond_pred - unc))  # the guided DDIM update with ∅_t

    def optimise(self, i: int, cond_pred) -> Conditioning:
        """∅_t for step i: Adam on the embedding so the guided step from z̄_t lands on z*_{t-1}."""
        den, x, t = self.denoiser, self.x, self._t(i)
        target = self.inv.latents[i + 1].to(x)  # [B, C, h, w]
        limit = self.eps + i * 2e-5
        null = parameters(self.null)
        opt = torch.optim.Adam(tensors(null), lr=self.lr * (1.0 - i / 100.0))
        taken = 0
        with trainable(den.unet, self.ckpt):
            for _ in range(self.inner):
                unc = den(x, t, den.condition(null, *self._size())).float()
                prev, _ = self.sampler.step(i, x, unc + self.scale * (cond_pred - unc), self.sampler.init_state(x))
                per_image = (prev - target).square().flatten(1).mean(1)  # [B]: each image's own MSE
                opt.zero_grad(set_to_none=True)
                per_image.sum().backward()
                opt.step()
                taken += 1
                if float(per_image.detach().max()) < limit:
                    break
        self.inner_run.append(taken)
        return detached(null)

    def _t(self, i):
        return self.sampler.timesteps[i].expand(self.x.shape[0])  # [B]

    def _size(self):
        return self.inv.settings["height"], self.inv.settings["width"]

    def result(self) -> Inversion:
        inv = self.inv
        extras = {"null.context": torch.stack([n.context for n in self.nulls])}  # [S, B, L, D]
        if self.nulls[0].pooled is not None:
            extras["null.pooled"] = torch.stack([n.pooled for n in self.nulls])  # [S, B, P]
        settings = dict(inv.settings, guidance_scale=self.scale, inversion_guidance_scale=inv.settings["guidance_scale"],
                        null_text=dict(inner_steps=self.inner, early_stop=self.eps, lr=self.lr,
                                       inner_steps_run=self.inner_run))
        return Inversion("null-text", inv.x0, inv.latents, inv.timesteps, inv.source, self.start.to(inv.x0.device),
                         settings=settings, extras={k: v.to(inv.x0.device) for k, v in extras.items()})


def invert_program(pipe, image, prompt: str = "", *, steps: int = 50, guidance_scale: float = 7.5,
                   inner_steps: int = 10, early_stop: float = 1e-5, lr: float = 1e-2, negative_prompt=None,
                   height: int | None = None, width: int | None = None, checkpointing: bool | None = None,
                   callback=None, seed=None) -> Chain:
    """Null-text-invert ``image`` under ``prompt`` for edits at ``guidance_scale``. ``negative_prompt``
    is where ∅ starts (default ""); ``checkpointing``: activation checkpointing in the
    optimisation (default: on for SDXL). ``seed`` is accepted for a uniform API (nothing is drawn)."""
    if guidance_scale <= 1.0:
        raise ValueError(f"null-text inversion optimises the unconditional embedding of guided edits: "
                         f"guidance_scale must exceed 1, got {guidance_scale}")
    if inner_steps < 1 or lr <= 0 or early_stop < 0:
        raise ValueError("inner_steps must be at least 1, lr positive and early_stop non-negative")
    first = ddim.invert_program(pipe, image, prompt, steps=steps, guidance_scale=1.0, height=height, width=width,
                                callback=callback)
    b = first.x0.shape[0]
    prompts = as_list(prompt, b, "prompt")
    null = pipe.encode_prompt(prompts, negative_prompt, guidance=True)[1]  # ∅ to start from [B, ...]
    first.settings["negative_prompt"] = negative_prompt
    ckpt = default_checkpointing(pipe.denoiser, checkpointing)
    stage = lambda inv: NullTextPass(pipe, inv, null, guidance_scale, inner_steps, early_stop, lr, ckpt,  # noqa: E731
                                     callback)
    return Chain(first, [(stage, steps)])


def invert(pipe, image, prompt: str = "", *, progress: bool = True, **params) -> Inversion:
    return run_one(pipe, invert_program(pipe, image, prompt, **params), progress)


edit_program = ddim.edit_program  # a null-text inversion is edited as a DDIM one, with its ∅_t per step
edit = ddim.edit
