"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024).

Algorithm 1 of the paper: draw every noisy latent x_t = sqrt(a_t) x0 + sqrt(1-a_t) e_t
with an independent e_t, then extract the noise map z_t that makes one stochastic
(DDIM eta=1 / DDPM) step land exactly on the next drawn latent:

    z_t = (x_{t-1} - mu_t(x_t, eps(x_t))) / sigma_t

Because the x_t are drawn independently, the T model evaluations do not depend on
each other: :class:`NoiseMaps` runs them as a few large batches (rows at different
timesteps in one model call, each batch one step of the loop) instead of T sequential
steps. Regenerating with the stored z_t and the source prompt reproduces x0 up to float
error; another prompt edits the image while the noise maps keep its structure.
"""

from __future__ import annotations

import torch

from ..sampling import make_sampler
from ..step import Program
from .common import guidance_for, image_size, run_one
from .ddim import regenerate_program
from .inversion import Inversion


def _sampler(pipe, steps: int, eta: float):
    return make_sampler("ddim", pipe.schedule, steps, eta=eta, device=pipe.device)


def noise_scale(sampler) -> torch.Tensor:
    """sigma_t of each step [S]: eta * sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev)) (DDIM Eq. 16)."""
    a_t, a_prev = sampler.alpha_t, sampler.alpha_prev
    return sampler.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


class NoiseMaps(Program):
    """z for every step, ``size`` timesteps (x B images) per loop step. xs, target: [S, B, C, h, w].

    Batched (default): all evaluated at the drawn x_t. ``exact`` (size 1): the paper's
    sequential loop, each step evaluated at the latent the previous step actually lands on
    (xs is updated in place), so a reconstruction replays the same float operations and
    returns x0 bit for bit.
    """

    def __init__(self, pipe, g, smp, xs, target, size: int, exact: bool, h: int, w: int, finish=None):
        self.denoiser, self.g, self.smp, self.xs, self.target = pipe.denoiser, g, smp, xs, target
        self.size, self.exact, self.finish = (1 if exact else size), exact, finish
        self.steps, self.b = xs.shape[:2]
        self.sigma = noise_scale(smp)  # [S]
        self.z = torch.empty_like(xs)
        self.lo = 0
        self._rows, self._g, self.hw = {}, {}, (h, w)

    def _block(self):
        hi = min(self.lo + self.size, self.steps)
        n = hi - self.lo
        if n not in self._rows:  # one conditioning per block size (the last block may be shorter)
            gt = self.g.tile(n)
            self._g[n] = gt
            self._rows[n] = self.denoiser.condition_guidance(gt, *self.hw)
        return hi, n

    def cond(self):
        return self._rows[self._block()[1]]

    def model_input(self):
        hi, _ = self._block()
        self.idx = torch.arange(self.lo, hi, device=self.xs.device).repeat_interleave(self.b)  # [n*B] step of each row
        x = self.xs[self.lo:hi].flatten(0, 1)  # [n*B, C, h, w]
        t = self.smp.timesteps[self.idx]
        if self.g.guided:
            x, t = torch.cat([x, x]), torch.cat([t, t])
        return x, t

    def combine(self, out):
        return self._g[self._block()[1]].combine(out)

    def advance(self, out):
        lo, (hi, n) = self.lo, self._block()
        idx, x = self.idx, self.xs[lo:hi].flatten(0, 1)  # [n*B, C, h, w]
        s = self.sigma[idx].view(-1, 1, 1, 1)  # [n*B, 1, 1, 1]
        mu, _ = self.smp.step(idx, x, out, noise=torch.zeros_like(x))  # the step's mean
        zz = torch.where(s > 0, (self.target[lo:hi].flatten(0, 1) - mu) / s.clamp(min=1e-12), torch.zeros_like(mu))
        self.z[lo:hi] = zz.view(n, self.b, *self.xs.shape[2:])
        if self.exact and hi < self.steps:
            self.xs[hi] = self.smp.step(idx, x, out, noise=zz)[0].view(self.b, *self.xs.shape[2:])  # where a replay lands
        self.lo = hi

    @property
    def done(self):
        return self.lo >= self.steps

    @property
    def steps_left(self):
        return -(-(self.steps - self.lo) // self.size)

    def result(self):
        return self.z if self.finish is None else self.finish(self.z)


def invert_program(pipe, image, prompt: str = "", *, steps: int = 50, guidance_scale: float = 3.5, skip: float = 0.0,
                   seed: int | None = 0, generator: torch.Generator | None = None, eta: float = 1.0,
                   negative_prompt=None, height: int | None = None, width: int | None = None,
                   batch_size: int = 16, exact: bool = False, image_prompt=None) -> NoiseMaps:
    """Edit-friendly DDPM inversion of ``image`` under ``prompt``.

    ``skip``: fraction of the noisiest steps an edit skips (it starts at step skip*steps).
    ``batch_size``: timesteps per model call (each needs 2 rows per image with guidance);
    lower it when memory is short. ``exact``: run the paper's sequential loop instead, so
    that reconstruction is bit-exact rather than exact up to float rounding (which the
    model can amplify over many steps, ~1e-4 on latents); it costs one model call per step.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0 <= skip < 1:
        raise ValueError(f"skip must be in [0, 1), got {skip}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    x0 = pipe.encode_image(image, height, width)  # [B, C, h, w]
    h, w = image_size(pipe, x0)
    g = guidance_for(pipe, prompt, negative_prompt, guidance_scale, h, w, x0.shape[0], image_prompt)
    smp = _sampler(pipe, steps, eta)
    a_t = smp.alpha_t.view(-1, 1, 1, 1, 1)  # [S, 1, 1, 1, 1]
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(0 if seed is None else seed)
    eps = torch.randn((steps, *x0.shape), generator=generator, device=generator.device, dtype=torch.float32)
    xs = (a_t.sqrt() * x0.float() + (1 - a_t).sqrt() * eps.to(x0.device)).to(x0.dtype)  # [S, B, C, h, w]
    target = torch.cat([xs[1:], x0[None]])  # [S, B, C, h, w]: where each step must land
    settings = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                    skip=skip, seed=seed, eta=eta, exact=exact, height=h, width=w, sampler="ddim",
                    replay=dict(sampler="ddim", steps=steps, eta=float(eta), overrides={}, skip=float(skip)))

    def finish(z):
        latents = torch.cat([xs, x0[None]])  # [S+1, B, C, h, w]
        return Inversion("ddpm", x0, latents, smp.timesteps, g.cond, g.uncond, noise=z, settings=settings)

    return NoiseMaps(pipe, g, smp, xs, target, batch_size, exact, h, w, finish)


@torch.no_grad()
def invert(pipe, image, prompt: str = "", *, progress: bool = True, **params) -> Inversion:
    return run_one(pipe, invert_program(pipe, image, prompt, **params), progress)


def edit_program(pipe, inv: Inversion, target_prompt=None, *, guidance_scale: float | None = None,
                 negative_prompt=None, skip: float | None = None, callback=None, image_prompt=None):
    """Regenerate from the stored noise maps under ``target_prompt`` (the source prompt when
    None: an exact reconstruction). The paper uses guidance 3.5 for the source and 15 for the
    target; the default here is the inversion's own guidance."""
    if inv.noise is None:
        raise ValueError(f"a {inv.method!r} inversion has no noise maps; invert with method='ddpm'")
    return regenerate_program(pipe, inv, target_prompt, guidance_scale=guidance_scale,
                              negative_prompt=negative_prompt, skip=skip, callback=callback, image_prompt=image_prompt)


@torch.no_grad()
def edit(pipe, inv: Inversion, target_prompt: str | None = None, *, progress: bool = True, **params) -> torch.Tensor:
    """Returns latents [B, C, h, w]."""
    return run_one(pipe, edit_program(pipe, inv, target_prompt, **params), progress)
