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
ancestral with noise correction) is :mod:`engine.editing.renoise_euler`.
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
    """ReNoise over DDIM (SD, SDXL). The sampler's part -- where the model reads, what the update
    is, the reference point -- sits in the hooks ``_t``, ``_model_x``, ``_forward_noised``,
    ``_eps`` and ``_step``; :class:`~engine.editing.renoise_euler.ReNoiseEulerInversion`
    overrides them for SDXL-Turbo's Euler ancestral sampler."""

    def __init__(self, pipe, g, x0, steps: int, settings: dict, *, renoise_steps: int, first_window, window,
                 max_first: int, average: bool, lambda_ac: float, lambda_kl: float, reg_steps: int, rolls: int,
                 seed: int, callback=None, sampler=None):
        smp = sampler or make_sampler("ddim_inverse", pipe.schedule, steps, device=pipe.device)
        super().__init__(pipe.denoiser, g, x0, smp, height=settings["height"], width=settings["width"],
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
        self.first = [int(self._t(i)) < FIRST_STEP_MAX_T for i in range(len(smp))]
        self.passes = [(min(max_first, renoise_steps) if f else renoise_steps) + 1 for f in self.first]
        self.extra = [0] * len(smp)  # model calls a step makes after its iterations (the Euler path's correction)

    def _window(self, i: int):
        return self.first_window if self.first[i] else self.window

    # ---- the protocol -------------------------------------------------------------------
    def _with_ref(self) -> bool:
        return self.reg and self.k == 0

    def cond(self) -> RowCond:
        return self.rows2 if self._with_ref() else self.rows

    def model_rows(self) -> int:
        return len(self.rows2) if self.reg else len(self.rows)

    # ---- the sampler's part (DDIM) ------------------------------------------------------
    def _t(self, i: int):
        """The timestep the model is read at in step i."""
        return self.sampler.timesteps[i]

    def _model_x(self, x, i: int):
        """The model's input for latents x in step i."""
        return x

    def _forward_noised(self, i: int):
        """The image noised to the level step i lands on (the KL reference's input)."""
        a = self.sampler.alpha_prev[i]
        return a.sqrt() * self.x0 + (1 - a).sqrt() * self.noise

    def _eps(self, x, out, i: int, k: int):
        """The noise the model's output ``out`` predicts at latents x, iteration k of step i: read at
        the level of the input it was predicted for (see the module docstring)."""
        level = self.sampler.alpha_t[i] if k == 0 else self.sampler.alpha_prev[i]
        return pred_x0_eps(x.float(), out.float(), level.view(1, 1, 1, 1), self.sampler.prediction_type)[1]

    def _step(self, i: int, eps):
        """inv_step(z_{t-1}, eps): the DDIM update from the step's start to the level it lands on."""
        return ddim_step(self.x, eps, self.sampler.alpha_t[i], self.sampler.alpha_prev[i], prediction_type="epsilon")[0]

    # ---- the protocol -------------------------------------------------------------------
    def model_input(self):
        i = self.i
        x = self._model_x(self.est, i)  # [B, C, h, w]
        if self._with_ref():
            x = torch.cat([self._model_x(self._forward_noised(i), i), x])  # [2B, C, h, w]
        return x, self._t(i).expand(x.shape[0])

    def advance(self, pred):
        i, k = self.i, self.k
        if self._with_ref():
            ref_out, pred = pred.float().chunk(2)
            self.ref = self._eps(self._forward_noised(i), ref_out, i, -1)  # eps at the forward-noised image
        eps = self._eps(self.est, pred, i, k)  # [B, C, h, w]
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
        self._end_step(i)

    def _end_step(self, i: int) -> None:
        """Step i's estimate is final: record it and move on."""
        self.x = self.est
        self.traj.append(self.x)
        if self.callback is not None:
            self.callback(dict(i=i, t=self._t(i).expand(self.x.shape[0]), x=self.x, x0=self.x0))
        self.i, self.k, self.avg, self.n_avg = i + 1, 0, None, 0

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
        return sum(self.passes[self.i:]) + sum(self.extra[self.i:]) - self.k

    def result(self) -> Inversion:
        forward = make_sampler("ddim", self.pipe.schedule, len(self.sampler), device=self.pipe.device)
        latents = torch.stack(self.traj[::-1])  # [S+1, B, C, h, w]; latents[0] the noisiest
        return Inversion("renoise", self.x0, latents, forward.timesteps, self.g.cond, self.g.uncond,
                         settings=self.settings)


# The official configurations: its SD example (DDIM) and its SDXL-Turbo one (Euler ancestral).
DEFAULTS = {"ddim": dict(steps=50, renoise_steps=1, noise_correction=False),
            "euler_ancestral": dict(steps=4, renoise_steps=9, noise_correction=True)}


def invert_program(pipe, image, prompt: str = "", *, steps: int | None = None, renoise_steps: int | None = None,
                   guidance_scale: float = 1.0, first_window=(0, 5), window=(8, 10), max_first: int = 5,
                   average: bool = True, lambda_ac: float = 20.0, lambda_kl: float = 0.065, reg_steps: int = 4,
                   rolls: int = 5, seed: int | None = 0, negative_prompt=None, height: int | None = None,
                   width: int | None = None, callback=None, image_prompt=None, sampler: str | None = None,
                   noise_correction: bool | None = None) -> ReNoiseInversion:
    """ReNoise-invert ``image`` under ``prompt`` (see the module docstring for the parameters).
    ``sampler``: "ddim", or "euler_ancestral" (SDXL-Turbo, :mod:`engine.editing.renoise_euler`,
    with ``noise_correction``); default: the model's own when it is Euler ancestral, else DDIM.
    ``steps`` / ``renoise_steps`` default to the official configuration of the sampler (50 / 1 for
    DDIM, 4 / 9 for Euler ancestral)."""
    sampler = sampler or ("euler_ancestral" if pipe.default_sampler == "euler_ancestral" else "ddim")
    if sampler not in DEFAULTS:
        raise ValueError(f"renoise inverts the samplers {sorted(DEFAULTS)}, got {sampler!r}")
    steps = DEFAULTS[sampler]["steps"] if steps is None else steps
    renoise_steps = DEFAULTS[sampler]["renoise_steps"] if renoise_steps is None else renoise_steps
    if noise_correction is not None and not isinstance(noise_correction, bool):
        raise ValueError(f"noise_correction must be true or false, got {noise_correction!r}")
    if noise_correction is None:
        noise_correction = DEFAULTS[sampler]["noise_correction"]
    elif noise_correction and sampler == "ddim":
        raise ValueError("noise_correction applies to the stochastic Euler ancestral sampler (sampler='euler_ancestral')")
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
    g, x0, settings = ddim.inversion_inputs(pipe, image, prompt, steps, guidance_scale, negative_prompt, height, width,
                                            image_prompt)
    seed = 0 if seed is None else seed
    settings.update(method="renoise", renoise_steps=renoise_steps, first_window=list(windows[0]),
                    window=list(windows[1]), max_first=max_first, average=average, lambda_ac=lambda_ac,
                    lambda_kl=lambda_kl, reg_steps=reg_steps, rolls=rolls, seed=seed, sampler=sampler,
                    noise_correction=bool(noise_correction))
    kw = dict(renoise_steps=renoise_steps, first_window=windows[0], window=windows[1], max_first=max_first,
              average=average, lambda_ac=lambda_ac, lambda_kl=lambda_kl, reg_steps=reg_steps, rolls=rolls, seed=seed,
              callback=callback)
    if sampler == "euler_ancestral":
        from .renoise_euler import ReNoiseEulerInversion

        return ReNoiseEulerInversion(pipe, g, x0.float(), steps, settings, correct=bool(noise_correction),
                                     overrides={}, **kw)
    return ReNoiseInversion(pipe, g, x0.float(), steps, settings, **kw)


@torch.no_grad()
def invert(pipe, image, prompt: str = "", *, progress: bool = True, **params) -> Inversion:
    return run_one(pipe, invert_program(pipe, image, prompt, **params), progress)
