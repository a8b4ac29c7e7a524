"""Flow inversion and RF-Inversion (Rout et al. 2024, "Semantic Image Inversion and Editing using
Rectified Stochastic Differential Equations") for FLUX models.

Rectified flow: x_sigma = (1 - sigma) x_0 + sigma * noise; the model predicts the velocity
dx/dsigma. **Flow inversion** runs the Euler ODE backwards, sigma 0 -> 1 on the reverse of the
sampler's grid; regenerating from its last latent replays the flow forwards.

**RF-Inversion** steers both passes with a *controlled* velocity, the model's pulled toward the
straight path to an anchor point ``a`` reached at time ``tau``:

    v_hat = v + w (v_line - v),   v_line = (a - x) / (tau - sigma)

* inversion (Algorithm 1, the controlled forward ODE): anchor y_1 ~ N(0, I) at tau = 1,
  weight gamma (0.5) at every step -- gamma = 0 is plain flow inversion;
* edit (Algorithm 2, the controlled reverse ODE): anchor y_0 = the image latents at tau = 0,
  weight eta (0.9) for the steps in [start, stop) x steps (0, 0.25), optionally decayed by
  (1 - i / S) ** eta_decay_power -- eta = 0 is plain generation from the inverted noise.

Both are :class:`~engine.step.SamplerProgram` s (the control is a change of ``combine``), so
they batch with every other request. Differences from the reference code (diffusers'
``examples/community/pipeline_flux_rf_inversion.py``), all on purpose: the inversion evaluates
the model at the sigma it has reached (the reference feeds i/(S+1) while stepping by the
shifted sigma differences), so gamma = 0 is exactly the reverse of the sampler; the image is
encoded with the VAE posterior's mode, not a sample, and y_1 is drawn from ``seed``, so an
inversion is reproducible; latents stay in float32 between steps.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..step import SamplerProgram
from .common import guidance_for, image_size, run_one
from .inversion import Inversion


def flipped(sampler, num_train_timesteps: int):
    """The reverse of a flow sampler's grid: sigmas 0 .. sigma_0 ascending, the model evaluated at
    the sigma each step starts from (the inversion's sampler)."""
    sig = sampler.sigmas.flip(0)  # [S+1]: 0, sigma_{S-1}, ..., sigma_0
    return replace(sampler, name="flow_euler_inverse", timesteps=sig[:-1] * num_train_timesteps, sigmas=sig)


class ControlledFlow(SamplerProgram):
    """A flow sampler whose velocity is pulled toward the straight path to ``anchor`` (reached at
    sigma ``tau``) with weight ``weights[i]`` at step i (0: the model's velocity untouched)."""

    def __init__(self, *args, anchor=None, tau: float = 1.0, weights=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.anchor, self.tau, self.weights = anchor, tau, list(weights)

    def combine(self, out):
        v = super().combine(out)  # [B, C, h, w] the (guided) velocity
        w = self.weights[self.i] if self.i < len(self.weights) else 0.0
        if w == 0.0:
            return v
        s = self.sampler.sigmas[self.i]
        line = (self.anchor - self.x) / (self.tau - s)  # [B, C, h, w]: dx/dsigma of the straight path
        return v.float() + w * (line - v.float())


class FlowInversion(ControlledFlow):
    """sigma 0 -> 1 from the image latents; records the trajectory and returns an :class:`Inversion`."""

    def __init__(self, pipe, g, x0, forward, settings: dict, y1=None, gamma: float = 0.0, callback=None, **kw):
        inverse = flipped(forward, pipe.schedule.num_train_timesteps)
        super().__init__(pipe.denoiser, g, x0, inverse, height=settings["height"], width=settings["width"],
                         callback=callback, anchor=y1, tau=1.0, weights=[gamma] * len(forward), **kw)
        self.pipe, self.x0, self.forward, self.settings, self.traj = pipe, x0, forward, settings, [x0]

    def after_update(self, i):
        self.traj.append(self.x)

    def result(self) -> Inversion:
        latents = torch.stack(self.traj[::-1])  # [S+1, B, C, h, w]; latents[0] the noisiest
        return Inversion(self.settings["method"], self.x0, latents, self.forward.timesteps.cpu(), self.g.cond,
                         self.g.uncond, settings=self.settings)


def invert_program(pipe, image, prompt: str = "", *, method: str = "rf-inversion", steps: int = 28,
                   gamma: float = 0.5, guidance_scale: float = 1.0, embedded_guidance: float | None = None,
                   negative_prompt=None, height: int | None = None, width: int | None = None, seed: int | None = 0,
                   callback=None, image_prompt=None) -> FlowInversion:
    """Invert ``image`` under ``prompt`` by the (controlled) reverse flow; ``gamma`` 0 (or
    method "flow") is plain flow inversion. FLUX.1-dev's embedded guidance defaults to 0 here, as
    the reference inverts (``source_guidance_scale``)."""
    if getattr(pipe, "arch", None) != "flux":
        raise ValueError(f"{method} inverts FLUX models; this is a {getattr(pipe, 'arch', '?')} model")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1] (0: plain flow inversion), got {gamma}")
    if method == "flow" and gamma:
        raise ValueError("flow inversion has no controller: drop gamma, or use method='rf-inversion'")
    x0 = pipe.encode_image(image, height, width)  # [B, C, h, w]
    h, w = image_size(pipe, x0)
    pipe.check_size(h, w)
    dev = pipe.transformer.config.guidance_embeds
    eg = (0.0 if dev else None) if embedded_guidance is None else embedded_guidance
    kw = pipe.embedded(eg)
    g = guidance_for(pipe, prompt, negative_prompt, guidance_scale, h, w, x0.shape[0], image_prompt)  # PuLID: Tight
    y1 = None
    if gamma:
        gen = torch.Generator("cpu").manual_seed(0 if seed is None else seed)
        y1 = torch.randn(x0.shape, generator=gen).to(pipe.device)  # [B, C, h, w] the anchor at sigma = 1
    settings = dict(method=method, prompt=prompt, negative_prompt=negative_prompt, steps=steps, gamma=gamma,
                    guidance_scale=guidance_scale, embedded_guidance=eg, seed=seed, height=h, width=w,
                    sampler="flow_euler")
    forward = pipe.flow_sampler(steps, h, w)
    return FlowInversion(pipe, g, x0.float(), forward, settings, y1, gamma, callback, **kw)


def eta_schedule(steps: int, eta: float, start: float, stop: float, decay_eta: bool = False,
                 eta_decay_power: float = 1.0) -> list[float]:
    """eta at each edit step: eta for steps int(start S) <= i < int(stop S), else 0 (as the reference),
    times (1 - i / S) ** power with ``decay_eta``."""
    if not 0.0 <= start <= stop <= 1.0:
        raise ValueError(f"need 0 <= start <= stop <= 1 (fractions of the steps), got start={start}, stop={stop}")
    lo, hi = int(start * steps), min(int(stop * steps), steps)
    out = [eta if lo <= i < hi else 0.0 for i in range(steps)]
    if decay_eta:
        out = [e * (1 - i / steps) ** eta_decay_power for i, e in enumerate(out)]
    return out


def edit_program(pipe, inv: Inversion, target_prompt=None, *, method: str | None = None, eta: float = 0.9,
                 start: float = 0.0, stop: float = 0.25, decay_eta: bool = False, eta_decay_power: float = 1.0,
                 guidance_scale: float | None = None, embedded_guidance: float | None = None,
                 negative_prompt=None, callback=None, image_prompt=None) -> ControlledFlow:
    """Regenerate ``inv`` under ``target_prompt`` (its own prompt when None), steered toward the
    image by ``eta`` for the steps in [start, stop); method "flow" (or eta 0) is plain generation."""
    method = method or "rf-inversion"
    if inv.method not in ("flow", "rf-inversion"):
        raise ValueError(f"{method} edits flow inversions (method 'flow' or 'rf-inversion'), not {inv.method!r}")
    if method == "flow" and eta:
        eta = 0.0
    if eta < 0:
        raise ValueError(f"eta must be 0 or more, got {eta}")
    s = inv.settings
    h, w, steps = s["height"], s["width"], inv.steps
    smp = pipe.flow_sampler(steps, h, w)
    if not torch.allclose(smp.timesteps.cpu(), inv.timesteps.float(), rtol=0, atol=1e-3):
        raise ValueError("this inversion's steps do not match this pipeline's schedule: invert again with this model")
    prompt = s.get("prompt", "") if target_prompt is None else target_prompt
    scale = s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    neg = s.get("negative_prompt") if negative_prompt is None else negative_prompt
    g = guidance_for(pipe, prompt, neg, scale, h, w, inv.x0.shape[0], image_prompt)
    dev = pipe.transformer.config.guidance_embeds
    kw = pipe.embedded((3.5 if dev else None) if embedded_guidance is None else embedded_guidance)
    x = inv.latents[0].to(pipe.device, torch.float32)  # [B, C, h, w] the inverted noise
    weights = eta_schedule(steps, eta, start, stop, decay_eta, eta_decay_power)
    return ControlledFlow(pipe.denoiser, g, x, smp, height=h, width=w, callback=callback,
                          anchor=inv.x0.to(pipe.device, torch.float32), tau=0.0, weights=weights, **kw)


def flow_invert_program(pipe, image, prompt: str = "", **params) -> FlowInversion:
    """Plain flow inversion (the baseline): the reverse Euler flow, no controller."""
    return invert_program(pipe, image, prompt, method="flow", gamma=0.0, **params)


def flow_edit_program(pipe, inv: Inversion, target_prompt=None, **params) -> ControlledFlow:
    """Plain generation from a flow inversion's noise under ``target_prompt``."""
    if params.get("eta"):
        raise ValueError("a plain flow edit has no controller: drop eta, or use method='rf-inversion'")
    params.pop("eta", None)
    return edit_program(pipe, inv, target_prompt, method="flow", eta=0.0, **params)


@torch.no_grad()
def invert(pipe, image, prompt: str = "", *, progress: bool = True, **params) -> Inversion:
    return run_one(pipe, invert_program(pipe, image, prompt, **params), progress)


@torch.no_grad()
def edit(pipe, inv: Inversion, target_prompt: str | None = None, *, progress: bool = True, **params):
    return run_one(pipe, edit_program(pipe, inv, target_prompt, **params), progress)


@torch.no_grad()
def flow_invert(pipe, image, prompt: str = "", *, progress: bool = True, **params) -> Inversion:
    return run_one(pipe, flow_invert_program(pipe, image, prompt, **params), progress)


@torch.no_grad()
def flow_edit(pipe, inv: Inversion, target_prompt: str | None = None, *, progress: bool = True, **params):
    return run_one(pipe, flow_edit_program(pipe, inv, target_prompt, **params), progress)
