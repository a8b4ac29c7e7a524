"""ReNoise inversion (Garibi et al. 2024, "ReNoise: Real Image Inversion Through Iterative
Noising"), for SD and SDXL with DDIM.

DDIM inversion estimates z_t from z_{t-1} with the noise predicted at z_{t-1}. ReNoise
refines that estimate by fixed-point iterations at each step, the model evaluated at the
current estimate of z_t itself:

    z_t^(0) = z_{t-1},   z_t^(k+1) = inv_step(z_{t-1}, eps(z_t^(k), t)),   k = 0 .. renoise_steps

and takes inv_step(z_{t-1}, mean eps) over the iterations in an averaging window (Sec. 3.2).
Each eps it uses is first regularised (Sec. 3.3; :mod:`engine.editing.regularise`): a patch-wise
KL step toward eps predicted at the forward-noised image (``lambda_kl``, the gradient clipped
to +-100) and auto-correlation steps with random rolls (``lambda_ac`` / ``rolls``),
``reg_steps`` times. Names and defaults as the official code's SD example (garibida/
ReNoise-Inversion): 50 steps, ``renoise_steps=1``, averaging windows (0, 5) for t < 250
(at most 5 renoising steps there) and (8, 10) above, lambda_ac 20, lambda_kl 0.065, 4
regularisation steps of 5 rolls, the prompt without classifier-free guidance.

One program on the one loop: every iteration is a loop step (one model call of B rows, 2B at an
iteration that also predicts the regularisation's reference), so a ReNoise inversion batches
with other requests. Its :class:`~engine.editing.Inversion` replays with DDIM: ``edit(inv,
"renoise", target)`` (or "ddim", "p2p", ...) regenerates from it.

Where ours differs from the official code: eps is read at the level of the input it was
predicted for (an iteration's estimate sits at t; the first, z_{t-1}, at t-1, as diffusers'
DDIMInverseScheduler reads it), so v-prediction models work and ``renoise_steps=0`` without
regularisation is exactly DDIM inversion; the KL reference is eps at the forward-noised image
for SD as for SDXL (the official SD path noises nothing there: its ``add_noise`` is replaced by
the identity); shifts and the fixed noise come from ``seed``. The SDXL-Turbo path (Euler
ancestral with noise correction) is not implemented yet.
"""

from __future__ import annotations

import torch

from ..sampling import make_sampler
from ..sampling.samplers import ddim_step, pred_x0_eps
from ..step import SamplerProgram
from ..step.denoiser import RowCond
from . import ddim
from .common import run_one
from .inversion import Inversion
from .regularise import _grad, autocorrelation_loss

FIRST_STEP_MAX_T = 250  # timesteps below this use the first-step window (the official constant)


def patch_kl(eps: torch.Tensor, ref: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """Per image [B]: sum over 4x4 patches and channels of |KL| between the Gaussians of eps's and
    ref's values in the patch (twice the KL, as the official ``latents_kl_divergence``)."""
    def stats(t):
        p = t.unfold(2, patch, patch).unfold(3, patch, patch).flatten(-2)  # [B, C, h/4, w/4, 16]
        return p.mean(-1), p.var(-1)

    mu0, var0 = stats(eps)
    mu1, var1 = stats(ref.detach())
    kl = torch.log((var1 + 1e-6) / (var0 + 1e-6)) + (var0 + (mu0 - mu1) ** 2) / (var1 + 1e-6) - 1
    return kl.abs().flatten(1).sum(1)


class ReNoiseInversion(SamplerProgram):
    def __init__(self, pipe, g, x0, steps: int, settings: dict, *, renoise_steps: int, first_window, window,
                 max_first: int, average: bool, lambda_ac: float, lambda_kl: float, reg_steps: int, rolls: int,
                 seed: int, callback=None):
        inverse = make_sampler("ddim_inverse", pipe.schedule, steps, device=pipe.device)
        super().__init__(pipe.denoiser, g, x0, inverse, height=settings["height"], width=settings["width"],
                         callback=callback)
        self.pipe, self.x0, self.settings, self.traj = pipe, x0, settings, [x0]
        self.K, self.first_window, self.window, self.max_first = renoise_steps, first_window, window, max_first
        self.average, self.lambda_ac, self.lambda_kl, self.reg_steps, self.rolls = average, lambda_ac, lambda_kl, reg_steps, rolls
        self.reg = reg_steps > 0 and (lambda_ac > 0 or lambda_kl > 0)
        gen = torch.Generator("cpu").manual_seed(seed)
        self.noise = torch.randn(x0.shape, generator=gen).to(x0.device)  # [B, C, h, w] the forward noise
        self.gen = gen  # the rolls' shifts
        self.rows2 = RowCond.cat([self.rows, self.rows])  # [forward-noised image; estimate] at a first iteration
        self.k, self.est, self.avg, self.n_avg, self.ref = 0, x0, None, 0, None
        # host-side per step (no device reads inside the steps): the first-step rule, the passes
        self.first = [int(t) < FIRST_STEP_MAX_T for t in inverse.timesteps.cpu()]
        self.passes = [(min(max_first, renoise_steps) if f else renoise_steps) + 1 for f in self.first]

    def _window(self, i: int):
        return self.first_window if self.first[i] else self.window

    # ---- the protocol -------------------------------------------------------------------
    def _with_ref(self) -> bool:
        return self.reg and self.k == 0

    def cond(self) -> RowCond:
        return self.rows2 if self._with_ref() else self.rows

    def model_rows(self) -> int:
        return len(self.rows2) if self.reg else len(self.rows)

    def model_input(self):
        i = self.i
        t = self.sampler.timesteps[i]
        x = self.est  # [B, C, h, w]
        if self._with_ref():
            a = self.sampler.alpha_prev[i]  # the level step i lands on
            fwd = a.sqrt() * self.x0 + (1 - a).sqrt() * self.noise  # the image noised to t
            x = torch.cat([fwd, x])  # [2B, C, h, w]
        return x, t.expand(x.shape[0])

    def advance(self, pred):
        i, k = self.i, self.k
        smp = self.sampler
        pt = smp.prediction_type
        if self._with_ref():
            ref_out, pred = pred.float().chunk(2)
            a = smp.alpha_prev[i].view(1, 1, 1, 1)
            fwd = a.sqrt() * self.x0 + (1 - a).sqrt() * self.noise
            self.ref = pred_x0_eps(fwd, ref_out, a, pt)[1]  # eps at the forward-noised image
        # eps read at the level of the input it was predicted for (see the module docstring)
        level = smp.alpha_t[i] if k == 0 else smp.alpha_prev[i]
        eps = pred_x0_eps(self.est.float(), pred.float(), level.view(1, 1, 1, 1), pt)[1]  # [B, C, h, w]
        lo, hi = self._window(i)
        if lo <= k < hi:  # running mean of the eps in the window (before regularisation)
            self.n_avg += 1
            self.avg = eps if self.avg is None else self.avg + (eps - self.avg) / self.n_avg
        if self.reg and (k >= lo or (not self.average and k > 0)):
            eps = self.regularise(eps)
        self.est = self._step(i, eps)
        self.k += 1
        if self.k < self.passes[i]:
            return
        if self.average and self.avg is not None:
            self.est = self._step(i, self.regularise(self.avg) if self.reg else self.avg)
        self.x = self.est
        self.traj.append(self.x)
        if self.callback is not None:
            self.callback(dict(i=i, t=smp.timesteps[i].expand(self.x.shape[0]), x=self.x, x0=self.x0))
        self.i, self.k, self.avg, self.n_avg = i + 1, 0, None, 0

    def _step(self, i: int, eps):
        """inv_step(z_{t-1}, eps): the DDIM update from the step's start to the level it lands on."""
        return ddim_step(self.x, eps, self.sampler.alpha_t[i], self.sampler.alpha_prev[i], prediction_type="epsilon")[0]

    def regularise(self, eps):
        """The official ``noise_regularization``: per step, one clipped patch-KL step toward the
        reference, then ``rolls`` auto-correlation steps of lambda_ac / rolls."""
        one = torch.ones(1, device=eps.device)
        with torch.enable_grad():
            for _ in range(self.reg_steps):
                if self.lambda_kl > 0:
                    grad = _grad(eps, eps, one, "epsilon", lambda e: patch_kl(e, self.ref))
                    eps = eps - self.lambda_kl * grad.clamp(-100, 100)
                if self.lambda_ac > 0:
                    for _ in range(self.rolls):
                        grad = _grad(eps, eps, one, "epsilon", lambda e: autocorrelation_loss(e, self.gen))
                        eps = eps - self.lambda_ac / self.rolls * grad
        return eps.detach()

    @property
    def steps_left(self) -> int:
        return sum(self.passes[self.i:]) - self.k

    def result(self) -> Inversion:
        forward = make_sampler("ddim", self.pipe.schedule, len(self.sampler), device=self.pipe.device)
        latents = torch.stack(self.traj[::-1])  # [S+1, B, C, h, w]; latents[0] the noisiest
        return Inversion("renoise", self.x0, latents, forward.timesteps, self.g.cond, self.g.uncond,
                         settings=self.settings)


def invert_program(pipe, image, prompt: str = "", *, steps: int = 50, renoise_steps: int = 1,
                   guidance_scale: float = 1.0, first_window=(0, 5), window=(8, 10), max_first: int = 5,
                   average: bool = True, lambda_ac: float = 20.0, lambda_kl: float = 0.065, reg_steps: int = 4,
                   rolls: int = 5, seed: int | None = 0, negative_prompt=None, height: int | None = None,
                   width: int | None = None, callback=None) -> ReNoiseInversion:
    """ReNoise-invert ``image`` under ``prompt`` (see the module docstring for the parameters)."""
    if renoise_steps < 0 or max_first < 0 or reg_steps < 0 or rolls < 1:
        raise ValueError("renoise_steps, max_first and reg_steps must be 0 or more, rolls at least 1")
    if lambda_ac < 0 or lambda_kl < 0:
        raise ValueError(f"lambda_ac and lambda_kl must be 0 or more, got {lambda_ac} and {lambda_kl}")
    if guidance_scale > 1:
        raise ValueError("ReNoise inverts without classifier-free guidance (the official code: guidance 0); "
                         "drop guidance_scale, and guide the edit instead")
    windows = []
    for name, w in (("first_window", first_window), ("window", window)):
        if not (isinstance(w, (tuple, list)) and len(w) == 2 and 0 <= int(w[0]) <= int(w[1])):
            raise ValueError(f"{name} must be a (start, stop) pair of iteration indices, got {w!r}")
        windows.append((int(w[0]), int(w[1])))
    g, x0, settings = ddim.inversion_inputs(pipe, image, prompt, steps, guidance_scale, negative_prompt, height, width)
    seed = 0 if seed is None else seed
    settings.update(method="renoise", renoise_steps=renoise_steps, first_window=list(windows[0]),
                    window=list(windows[1]), max_first=max_first, average=average, lambda_ac=lambda_ac,
                    lambda_kl=lambda_kl, reg_steps=reg_steps, rolls=rolls, seed=seed)
    return ReNoiseInversion(pipe, g, x0.float(), steps, settings, renoise_steps=renoise_steps,
                            first_window=windows[0], window=windows[1], max_first=max_first, average=average,
                            lambda_ac=lambda_ac, lambda_kl=lambda_kl, reg_steps=reg_steps, rolls=rolls, seed=seed,
                            callback=callback)


@torch.no_grad()
def invert(pipe, image, prompt: str = "", *, progress: bool = True, **params) -> Inversion:
    return run_one(pipe, invert_program(pipe, image, prompt, **params), progress)
