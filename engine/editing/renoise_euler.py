"""ReNoise for SDXL-Turbo (Garibi et al. 2024, Sec. 3.4 and the official code's Turbo example):
inversion of the Euler ancestral sampler, few steps, with noise correction.

SDXL-Turbo samples with Euler ancestral (diffusers' EulerAncestralDiscreteScheduler, trailing
spacing, 4 steps: t = 999, 749, 499, 249). Its forward step k, from z_k at sigma_k to sigma_{k+1},
is z_{k+1} = z_k + d(z_k) dt_k + n_k sigma_up_k with d the ODE derivative, dt_k = sigma_down_k -
sigma_k and n_k the step's noise (:func:`~engine.sampling.samplers.ancestral_sigmas`). Inverting
it, z_k = z_{k+1} - d(z_k) dt_k - n_k sigma_up_k, needs d at the unknown z_k: ReNoise's fixed-point
iterations, the model read at step k's timestep and scaling on the current estimate (the
official reads every iteration there, the first on z_{k+1} itself), with its averaging windows
and regularisation (:class:`~engine.editing.renoise.ReNoiseInversion`). The noises n_k are fixed
draws kept with the inversion; **noise correction** then moves n_k toward the noise that makes
the forward step from the inverted z_k land exactly on z_{k+1} (one more model call at z_k;
10 steps of 1.8 along the unit direction, the gradient of the official's L2-norm loss), so that
replaying the stored noises reconstructs the image. Defaults as the official Turbo config: 4
steps, 9 renoising iterations (5 at the first step, t < 250), windows (0, 5) and (8, 10),
lambda_ac 20, lambda_kl 0.065, 4 regularisation steps of 5 rolls, no guidance.

The inversion replays with the Euler ancestral sampler and its corrected noise maps: ``edit(inv,
"renoise", target)`` (or "ddpm", "p2p", "ledits++": any edit of noise-map inversions) is a 4-step
edit, and a reconstruction and an edit batch in one call per step.
"""

from __future__ import annotations

import torch

from ..sampling import make_sampler
from ..sampling.samplers import ancestral_sigmas, bcast, euler_step
from .inversion import Inversion
from .renoise import ReNoiseInversion

CORRECTION_STEPS, CORRECTION_RATE = 10, 1.8  # the official noise correction (optimize_epsilon_type)


def correct_noise(noise: torch.Tensor, required: torch.Tensor, steps: int = CORRECTION_STEPS,
                  rate: float = CORRECTION_RATE) -> torch.Tensor:
    """``steps`` gradient steps of size ``rate`` on ||n - required||_2 per image: each moves n by
    ``rate`` along the unit direction toward ``required`` (the official loss is the norm, not its
    square, so its gradient has unit length; it oscillates once closer than ``rate``)."""
    n = noise.float()
    for _ in range(steps):
        diff = n - required  # [B, C, h, w]
        norm = diff.flatten(1).norm(dim=1).clamp_min(1e-12)  # [B]
        n = n - rate * diff / bcast(norm, diff)
    return n


class ReNoiseEulerInversion(ReNoiseInversion):
    """Loop step j inverts the sampler's step k = S-1-j (the least noisy first). With ``correct``,
    a step with sigma_up > 0 ends with one more model call, at the final estimate, that corrects
    its noise map."""

    def __init__(self, pipe, g, x0, steps: int, settings: dict, *, correct: bool, overrides: dict, **kw):
        smp = make_sampler("euler_ancestral", pipe.schedule, steps, device=pipe.device, **overrides)
        super().__init__(pipe, g, x0, steps, settings, sampler=smp, **kw)
        self.correct, self.overrides = correct, overrides
        self.maps = torch.randn((steps, *x0.shape), generator=self.gen).to(x0.device)  # [S, B, C, h, w] n_k
        sig = smp.sigmas.cpu()
        up = [float(ancestral_sigmas(sig[k], sig[k + 1])[0]) for k in range(steps)]
        self.extra = [int(correct and up[self._k(j)] > 0) for j in range(steps)]  # the correction's model call
        self.correcting = False

    def _k(self, j: int) -> int:
        return len(self.sampler) - 1 - j

    def _sigmas(self, j: int):
        s = self.sampler.sigmas
        k = self._k(j)
        up, down = ancestral_sigmas(s[k], s[k + 1])
        return s[k], up, down

    # ---- the sampler's part (Euler ancestral) -------------------------------------------
    def _t(self, j: int):
        return self.sampler.timesteps[self._k(j)]

    def _model_x(self, x, j: int):
        return self.sampler.scale_model_input(x, self._k(j))

    def _forward_noised(self, j: int):
        return self.x0 + self._sigmas(j)[0] * self.noise  # the Euler schedulers' add_noise

    def _eps(self, x, out, j: int, k: int):
        """The ODE derivative d = (x - x0) / sigma at latents x (the noise, for epsilon models)."""
        sigma = self._sigmas(j)[0]
        x0 = euler_step(x.float(), out.float(), sigma.view(1), sigma.view(1),
                        prediction_type=self.sampler.prediction_type)[1]
        return (x.float() - x0) / sigma

    def _step(self, j: int, eps):
        """z_k = z_{k+1} - d dt_k - n_k sigma_up_k (the official ``inv_step``)."""
        sigma, up, down = self._sigmas(j)
        return self.x - eps * (down - sigma) - self.maps[self._k(j)] * up

    # ---- the protocol -------------------------------------------------------------------
    def _with_ref(self) -> bool:
        return super()._with_ref() and not self.correcting

    def advance(self, pred):
        if not self.correcting:
            return super().advance(pred)
        j = self.i
        sigma, up, down = self._sigmas(j)
        d = self._eps(self.est, pred, j, 0)  # at the inverted z_k
        required = (self.x - (self.est + d * (down - sigma))) / up  # the noise landing exactly on z_{k+1}
        k = self._k(j)
        self.maps[k] = correct_noise(self.maps[k], required)
        self.correcting = False
        super()._end_step(j)

    def _end_step(self, j: int) -> None:
        if self.extra[j]:
            self.correcting = True  # one more call, at the final estimate
            return
        super()._end_step(j)

    def result(self) -> Inversion:
        latents = torch.stack(self.traj[::-1])  # [S+1, B, C, h, w]; latents[0] the noisiest (sigma_0)
        s = dict(self.settings, replay=dict(sampler="euler_ancestral", steps=len(self.sampler), eta=0.0,
                                            overrides=self.overrides, skip=None))
        return Inversion("renoise", self.x0, latents, self.sampler.timesteps, self.g.cond, self.g.uncond,
                         noise=self.maps.clone(), settings=s)
