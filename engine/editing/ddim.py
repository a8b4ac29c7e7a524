"""DDIM inversion (Song et al. 2021, Sec. 4.3; as used by Mokady et al. 2023 and Hertz et al. 2022).

Run the deterministic DDIM update backwards, x_{t-1} -> x_t, with the model's noise
prediction at the level being reached (diffusers' ``DDIMInverseScheduler``), from the
clean latents up to the noisiest step. Regenerating from the last latent with the
same prompt and guidance approximately reproduces the image (exactly only in the
limit of many steps); regenerating with another prompt edits it.
"""

from __future__ import annotations

import torch

from ..sampling import make_sampler, sample
from .inversion import Inversion


def image_size(pipe, x0) -> tuple[int, int]:
    f = pipe.vae_scale_factor
    return x0.shape[-2] * f, x0.shape[-1] * f


def guidance_for(pipe, prompt, negative_prompt, scale, height, width, rows: int):
    """Guidance for ``rows`` images: one prompt for all of them, or one prompt per image."""
    n = 1 if isinstance(prompt, str) else len(prompt)
    if rows % n:
        raise ValueError(f"{n} prompts for {rows} images; give one prompt, or one per image")
    return pipe.guidance(prompt, negative_prompt, scale, height, width, num_images=rows // n)


@torch.no_grad()
def invert(pipe, image, prompt: str = "", *, steps: int = 50, guidance_scale: float = 1.0,
           negative_prompt=None, height: int | None = None, width: int | None = None,
           progress: bool = True, callback=None, seed=None) -> Inversion:
    """DDIM-invert ``image`` under ``prompt`` (guidance > 1 inverts the guided model).

    ``seed`` is accepted for a uniform API; DDIM inversion draws nothing.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    x0 = pipe.encode_image(image, height, width)  # [B, C, h, w]
    h, w = image_size(pipe, x0)
    g = guidance_for(pipe, prompt, negative_prompt, guidance_scale, h, w, x0.shape[0])
    inverse = make_sampler("ddim_inverse", pipe.schedule, steps, device=pipe.device)
    traj = [x0]

    def keep(d):
        traj.append(d["x"])
        if callback is not None:
            callback(d)

    sample(pipe.model_fn(g), x0, inverse, callback=keep, progress=progress)
    forward = make_sampler("ddim", pipe.schedule, steps, device=pipe.device)
    latents = torch.stack(traj[::-1])  # [S+1, B, C, h, w]; latents[0] the noisiest
    settings = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                    height=h, width=w, sampler="ddim")
    return Inversion("ddim", x0, latents, forward.timesteps, g.cond, g.uncond, settings=settings)


@torch.no_grad()
def edit(pipe, inv: Inversion, target_prompt: str | None = None, *, guidance_scale: float | None = None,
         negative_prompt=None, progress: bool = True, callback=None, plan=None) -> torch.Tensor:
    """Plain DDIM regeneration from the inversion's noisiest latent under ``target_prompt``
    (the source prompt when None: a reconstruction). Returns latents [B, C, h, w]."""
    s = inv.settings
    prompt = s.get("prompt", "") if target_prompt is None else target_prompt
    scale = s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    neg = s.get("negative_prompt") if negative_prompt is None else negative_prompt
    g = guidance_for(pipe, prompt, neg, scale, s.get("height"), s.get("width"), inv.x0.shape[0])
    forward = make_sampler("ddim", pipe.schedule, inv.steps, device=pipe.device)
    x = inv.latents[0].to(pipe.device, torch.float32)  # the loop keeps latents in float32
    return sample(pipe.model_fn(g, plan), x, forward, callback=callback, progress=progress)
