"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024).

Algorithm 1 of the paper: draw every noisy latent x_t = sqrt(a_t) x0 + sqrt(1-a_t) e_t
with an independent e_t, then extract the noise map z_t that makes one stochastic
(DDIM eta=1 / DDPM) step land exactly on the next drawn latent:

    z_t = (x_{t-1} - mu_t(x_t, eps(x_t))) / sigma_t

Because the x_t are drawn independently, the T model evaluations do not depend on
each other: we run them as a few large batches (rows at different timesteps in one
UNet call) instead of T sequential steps. Regenerating with the stored z_t and the
source prompt reproduces x0 up to float error; another prompt edits the image while
the noise maps keep its structure.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..sampling import make_sampler, sample
from .ddim import guidance_for, image_size
from .inversion import Inversion


def _sampler(pipe, steps: int, eta: float):
    return make_sampler("ddim", pipe.schedule, steps, eta=eta, device=pipe.device)


def noise_scale(sampler) -> torch.Tensor:
    """sigma_t of each step [S]: eta * sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev)) (DDIM Eq. 16)."""
    a_t, a_prev = sampler.alpha_t, sampler.alpha_prev
    return sampler.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


@torch.no_grad()
def invert(pipe, image, prompt: str = "", *, steps: int = 50, guidance_scale: float = 3.5, skip: float = 0.0,
           seed: int | None = 0, generator: torch.Generator | None = None, eta: float = 1.0,
           negative_prompt=None, height: int | None = None, width: int | None = None,
           batch_size: int = 16, exact: bool = False, progress: bool = True) -> Inversion:
    """Edit-friendly DDPM inversion of ``image`` under ``prompt``.

    ``skip``: fraction of the noisiest steps an edit skips (it starts at step skip*steps).
    ``batch_size``: timesteps per UNet call (each needs 2 rows per image with guidance);
    lower it when memory is short. ``exact``: run the paper's sequential loop instead, so
    that reconstruction is bit-exact rather than exact up to float rounding (which the
    model can amplify over many steps, ~1e-4 on latents); it costs one UNet call per step.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0 <= skip < 1:
        raise ValueError(f"skip must be in [0, 1), got {skip}")
    x0 = pipe.encode_image(image, height, width)  # [B, C, h, w]
    b = x0.shape[0]
    h, w = image_size(pipe, x0)
    g = guidance_for(pipe, prompt, negative_prompt, guidance_scale, h, w, b)
    smp = _sampler(pipe, steps, eta)
    a_t = smp.alpha_t.view(-1, 1, 1, 1, 1)  # [S, 1, 1, 1, 1]
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(0 if seed is None else seed)
    eps = torch.randn((steps, *x0.shape), generator=generator, device=generator.device, dtype=torch.float32)
    xs = (a_t.sqrt() * x0.float() + (1 - a_t).sqrt() * eps.to(x0.device)).to(x0.dtype)  # [S, B, C, h, w]
    target = torch.cat([xs[1:], x0[None]])  # [S, B, C, h, w]: where each step must land
    z = noise_maps(pipe, g, smp, xs, target, batch_size, progress, exact)
    latents = torch.cat([xs, x0[None]])  # [S+1, B, C, h, w]
    settings = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                    skip=skip, seed=seed, eta=eta, exact=exact, height=h, width=w, sampler="ddim")
    return Inversion("ddpm", x0, latents, smp.timesteps, g.cond, g.uncond, noise=z, settings=settings)


def noise_maps(pipe, g, smp, xs, target, batch_size: int, progress: bool = True, exact: bool = False) -> torch.Tensor:
    """z for every step. xs, target: [S, B, C, h, w].

    Batched (default): many steps per UNet call, all evaluated at the drawn x_t.
    ``exact``: the paper's sequential loop, one step per call, each evaluated at the
    latent the previous step actually lands on (xs is updated in place), so that a
    reconstruction replays the same float operations and returns x0 bit for bit.
    """
    steps, b = xs.shape[:2]
    sigma = noise_scale(smp)  # [S]
    z = torch.empty_like(xs)
    size = 1 if exact else batch_size
    for lo in tqdm(range(0, steps, size), disable=not progress):
        hi = min(lo + size, steps)
        idx = torch.arange(lo, hi, device=xs.device).repeat_interleave(b)  # [n*B] step of each row
        x = xs[lo:hi].flatten(0, 1)  # [n*B, C, h, w]
        out = pipe.model_fn(g.tile(hi - lo))(x, smp.timesteps[idx])  # [n*B, C, h, w]
        s = sigma[idx].view(-1, 1, 1, 1)  # [n*B, 1, 1, 1]
        mu, _ = smp.step(idx, x, out, noise=torch.zeros_like(x))  # the step's mean
        zz = torch.where(s > 0, (target[lo:hi].flatten(0, 1) - mu) / s.clamp(min=1e-12), torch.zeros_like(mu))
        z[lo:hi] = zz.view(hi - lo, b, *xs.shape[2:])
        if exact and hi < steps:
            xs[hi] = smp.step(idx, x, out, noise=zz)[0].view(b, *xs.shape[2:])  # where a replay lands
    return z


@torch.no_grad()
def edit(pipe, inv: Inversion, target_prompt: str | None = None, *, guidance_scale: float | None = None,
         negative_prompt=None, skip: float | None = None, progress: bool = True, callback=None,
         plan=None) -> torch.Tensor:
    """Regenerate from the stored noise maps under ``target_prompt`` (the source prompt when
    None: an exact reconstruction). The paper uses guidance 3.5 for the source and 15 for the
    target; the default here is the inversion's own guidance. Returns latents [B, C, h, w]."""
    if inv.noise is None:
        raise ValueError(f"a {inv.method!r} inversion has no noise maps; invert with method='ddpm'")
    s = inv.settings
    prompt = s.get("prompt", "") if target_prompt is None else target_prompt
    scale = s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    neg = s.get("negative_prompt") if negative_prompt is None else negative_prompt
    g = guidance_for(pipe, prompt, neg, scale, s.get("height"), s.get("width"), inv.x0.shape[0])
    smp = _sampler(pipe, inv.steps, s.get("eta", 1.0))
    start = int(inv.steps * (s.get("skip", 0.0) if skip is None else skip))
    x = inv.latents[start].to(pipe.device, torch.float32)  # the loop keeps latents in float32
    noise = inv.noise.to(pipe.device, pipe.dtype)
    return sample(pipe.model_fn(g, plan), x, smp, noise_fn=lambda i, out: noise[i], callback=callback,
                  progress=progress, start=start)
