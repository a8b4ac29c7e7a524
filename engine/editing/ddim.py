"""DDIM inversion (Song et al. 2021, Sec. 4.3; as used by Mokady et al. 2023 and Hertz et al. 2022).

Run the deterministic DDIM update backwards, x_{t-1} -> x_t, with the model's noise
prediction at the level being reached (diffusers' ``DDIMInverseScheduler``), from the
clean latents up to the noisiest step. Regenerating from the last latent with the
same prompt and guidance approximately reproduces the image (exactly only in the
limit of many steps); regenerating with another prompt edits it.

Both directions are :class:`~engine.step.SamplerProgram` s on the one loop; the
regeneration (``edit``) also serves edit-friendly DDPM inversions (their replay drives
the noisy steps with the stored maps).
"""

from __future__ import annotations

import torch

from ..sampling import make_sampler
from ..step import SamplerProgram, stored_noise
from .common import guidance_for, image_size, run_one
from .inversion import Inversion


class DDIMInversion(SamplerProgram):
    """The inverse sampler from x0; records the trajectory and returns an :class:`Inversion`."""

    def __init__(self, pipe, g, x0, steps: int, settings: dict, callback=None):
        h, w = settings["height"], settings["width"]
        inverse = make_sampler("ddim_inverse", pipe.schedule, steps, device=pipe.device)
        super().__init__(pipe.denoiser, g, x0, inverse, height=h, width=w, callback=callback)
        self.pipe, self.x0, self.traj, self.settings = pipe, x0, [x0], settings

    def after_update(self, i):
        self.traj.append(self.x)

    def result(self) -> Inversion:
        forward = make_sampler("ddim", self.pipe.schedule, len(self.sampler), device=self.pipe.device)
        latents = torch.stack(self.traj[::-1])  # [S+1, B, C, h, w]; latents[0] the noisiest
        return Inversion("ddim", self.x0, latents, forward.timesteps, self.g.cond, self.g.uncond,
                         settings=self.settings)


def inversion_inputs(pipe, image, prompt, steps: int, guidance_scale: float, negative_prompt=None,
                     height: int | None = None, width: int | None = None, image_prompt=None):
    """(guidance, x0 [B, C, h, w], settings) of a DDIM inversion of ``image`` under ``prompt``:
    what :class:`DDIMInversion` and the inversions built on it start from. ``image_prompt``: the
    image's own IP-Adapter tokens on every row (Tight Inversion)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    x0 = pipe.encode_image(image, height, width)  # [B, C, h, w]
    h, w = image_size(pipe, x0)
    g = guidance_for(pipe, prompt, negative_prompt, guidance_scale, h, w, x0.shape[0], image_prompt)
    settings = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                    height=h, width=w, sampler="ddim",
                    replay=dict(sampler="ddim", steps=steps, eta=0.0, overrides={}, skip=None))
    return g, x0, settings


def invert_program(pipe, image, prompt: str = "", *, steps: int = 50, guidance_scale: float = 1.0,
                   negative_prompt=None, height: int | None = None, width: int | None = None,
                   callback=None, seed=None, image_prompt=None) -> DDIMInversion:
    """DDIM-invert ``image`` under ``prompt`` (guidance > 1 inverts the guided model).
    ``seed`` is accepted for a uniform API; DDIM inversion draws nothing."""
    g, x0, settings = inversion_inputs(pipe, image, prompt, steps, guidance_scale, negative_prompt, height, width,
                                       image_prompt)
    return DDIMInversion(pipe, g, x0, steps, settings, callback)


@torch.no_grad()
def invert(pipe, image, prompt: str = "", *, progress: bool = True, **params) -> Inversion:
    return run_one(pipe, invert_program(pipe, image, prompt, **params), progress)


def regenerate_program(pipe, inv: Inversion, target_prompt=None, *, guidance_scale: float | None = None,
                       negative_prompt=None, skip: float | None = None, callback=None,
                       image_prompt=None) -> SamplerProgram:
    """Replay ``inv`` under ``target_prompt`` (the source prompt when None: a reconstruction):
    plain DDIM from the noisiest latent, or, for an inversion with noise maps, the stochastic
    steps driven by them from ``skip``. Guidance defaults to the inversion's own; a null-text
    inversion's unconditional rows take its optimised embedding at each step. ``image_prompt``:
    IP-Adapter tokens every row reads (a Tight Inversion's image)."""
    s = inv.settings
    prompt = s.get("prompt", "") if target_prompt is None else target_prompt
    scale = s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    neg = s.get("negative_prompt") if negative_prompt is None else negative_prompt
    g = guidance_for(pipe, prompt, neg, scale, s.get("height"), s.get("width"), inv.x0.shape[0], image_prompt)
    rp = inv.replay(pipe.schedule, pipe.device, pipe.dtype, skip)
    noise = None if rp.noise is None else stored_noise(rp.noise, rp.first)
    nulls = inv.uncond_steps(rp.start, negative_prompt) if g.guided else None  # null-text: ∅_t per step
    return SamplerProgram(pipe.denoiser, g, rp.x, rp.sampler, height=s.get("height"), width=s.get("width"),
                          start=rp.first + rp.start, noise=noise, callback=callback, uncond_steps=nulls)


def edit_program(pipe, inv: Inversion, target_prompt=None, *, plan=None, **params) -> SamplerProgram:
    """Plain DDIM regeneration from the inversion's noisiest latent under ``target_prompt``."""
    if plan is not None:
        raise ValueError("the ddim edit takes no attention plan; use method='p2p' for attention edits")
    return regenerate_program(pipe, inv, target_prompt, **params)


@torch.no_grad()
def edit(pipe, inv: Inversion, target_prompt: str | None = None, *, progress: bool = True, **params) -> torch.Tensor:
    """Regenerate under ``target_prompt``; returns latents [B, C, h, w]."""
    return run_one(pipe, edit_program(pipe, inv, target_prompt, **params), progress)
