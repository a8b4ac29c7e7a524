"""Batched sampler steps with a per-row step index (k-diffusion style standalone functions).

Every ``*_step`` function is pure tensor math on per-row schedule values ([B] tensors,
broadcast over the sample's trailing dims), so rows of one batch may sit at different
timesteps. No ``.item()`` and no Python branching on tensor values: a step can be
captured in a CUDA graph. The arithmetic follows diffusers' schedulers operation by
operation so results agree to float32 rounding.

The `Sampler` classes hold per-step schedule tables (device tensors indexed by the
step index ``i``, an int or a [B] int64 tensor) and wrap the step functions; see
`make_sampler` in `engine.sampling.front` for the uniform entry point.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Union

import torch
from torch import Tensor

Index = Union[int, Tensor]  # a step index for the whole batch, or one per row ([B] int64)


# ----------------------------------------------------------------------------- helpers


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """[B] (or []) per-row values -> [B, 1, ..., 1] to broadcast against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim == 1 else v


def rows(i: Index, x: Tensor) -> Tensor:
    """Step index as a [B] int64 tensor on x's device."""
    if isinstance(i, int):
        return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    return i.to(device=x.device, dtype=torch.long).expand(x.shape[0])


def pred_x0_eps(x: Tensor, out: Tensor, alpha_t: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """x0 and epsilon from a model output at alpha_bar_t (VP parameterisation, Ho et al. 2020;
    v-prediction of Salimans & Ho 2022: v = sqrt(a) eps - sqrt(1-a) x0)."""
    beta_t = 1 - alpha_t
    if prediction_type == "epsilon":
        x0 = (x - beta_t**0.5 * out) / alpha_t**0.5
        eps = out
    elif prediction_type == "sample":
        x0 = out
        eps = (x - alpha_t**0.5 * x0) / beta_t**0.5
    elif prediction_type == "v_prediction":
        x0 = alpha_t**0.5 * x - beta_t**0.5 * out
        eps = alpha_t**0.5 * out + beta_t**0.5 * x
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


# ----------------------------------------------------------------------------- step math


def ddim_step(
    x: Tensor,
    model_output: Tensor,
    alpha_t: Tensor,
    alpha_prev: Tensor,
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    noise: Tensor | None = None,
    clip_range: float | None = None,
    use_clipped_model_output: bool = False,
) -> tuple[Tensor, Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12) from alpha_bar_t to alpha_bar_prev.

    x, model_output: [B, ...]; alpha_t, alpha_prev: [B] cumulative alphas. eta > 0 adds
    sigma_t = eta * sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev)) of the given noise.
    With alpha_prev > alpha_t this is the deterministic DDIM *inversion* step as well.
    Returns (x_prev, x0).
    """
    a_t, a_prev = bcast(alpha_t, x), bcast(alpha_prev, x)  # [B, 1, 1, 1]
    x0, eps = pred_x0_eps(x, model_output, a_t, prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    if use_clipped_model_output:
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    if eta > 0:
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)  # [B, 1, 1, 1]
        std = eta * variance**0.5
        direction = (1 - a_prev - std**2) ** 0.5 * eps
    else:
        direction = (1 - a_prev) ** 0.5 * eps  # == diffusers' (1 - a_prev - 0**2) ** 0.5
    x_prev = a_prev**0.5 * x0 + direction  # [B, C, H, W]
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + std * noise
    return x_prev, x0


def ddpm_step(
    x: Tensor,
    model_output: Tensor,
    alpha_t: Tensor,
    alpha_prev: Tensor,
    *,
    prediction_type: str = "epsilon",
    noise: Tensor | None = None,
    noise_mask: Tensor | None = None,
    clip_range: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral DDPM step (Ho et al. 2020, eqs. 6-7) with the "fixed_small" posterior
    variance beta_tilde = (1-a_prev)/(1-a_t) * beta_t.

    noise_mask: [B] bool, rows that get noise (diffusers adds none at t == 0).
    Returns (x_prev, x0).
    """
    a_t, a_prev = bcast(alpha_t, x), bcast(alpha_prev, x)  # [B, 1, 1, 1]
    beta_t, beta_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    x0, _ = pred_x0_eps(x, model_output, a_t, prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    c_x0 = (a_prev**0.5 * cur_beta) / beta_t  # posterior mean coefficients (eq. 7)
    c_x = cur_alpha**0.5 * beta_prev / beta_t
    x_prev = c_x0 * x0 + c_x * x  # [B, C, H, W]
    if noise is not None:
        variance = torch.clamp((1 - a_prev) / (1 - a_t) * cur_beta, min=1e-20)
        noisy = x_prev + variance**0.5 * noise
        x_prev = noisy if noise_mask is None else torch.where(bcast(noise_mask, x), noisy, x_prev)
    return x_prev, x0


def euler_step(
    x: Tensor, model_output: Tensor, sigma: Tensor, sigma_next: Tensor, *, prediction_type: str = "epsilon"
) -> tuple[Tensor, Tensor]:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - x0) / sigma
    (Karras et al. 2022, Algorithm 1 without churn) in the VE parameterisation
    x = x0 + sigma * eps. x: [B, ...] (unscaled), sigma, sigma_next: [B]. Returns (x_next, x0).
    x_next has the wider of x's and model_output's dtypes (diffusers: the model output's),
    so a float32 latent stays float32 under a half-precision model."""
    dtype = torch.promote_types(x.dtype, model_output.dtype)
    x = x.float()
    s, s_next = bcast(sigma, x), bcast(sigma_next, x)  # [B, 1, 1, 1]
    if prediction_type == "epsilon":
        x0 = x - s * model_output
    elif prediction_type == "v_prediction":
        x0 = model_output * (-s / (s**2 + 1) ** 0.5) + (x / (s**2 + 1))
    elif prediction_type == "sample":
        x0 = model_output
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    d = (x - x0) / s  # [B, C, H, W]
    x_next = x + d * (s_next - s)
    return x_next.to(dtype), x0


def ancestral_sigmas(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """(sigma_up, sigma_down) of an ancestral step sigma -> sigma_next (Karras et al. 2022's
    k-diffusion ``get_ancestral_step`` with eta 1): a deterministic move to sigma_down, then
    fresh noise of scale sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_next^2."""
    up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return up, (sigma_next**2 - up**2) ** 0.5


def flow_euler_step(x: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """One Euler step of a rectified-flow ODE (Liu et al. 2022; Esser et al. 2024):
    x_sigma = (1 - sigma) x0 + sigma * noise, velocity = noise - x0. Returns (x_next, x0)
    (x_next in the wider of x's and velocity's dtypes, as `euler_step`)."""
    dtype = torch.promote_types(x.dtype, velocity.dtype)
    x = x.float()
    s, s_next = bcast(sigma, x), bcast(sigma_next, x)  # [B, 1, 1, 1]
    x_next = x + (s_next - s) * velocity  # [B, C, H, W]
    return x_next.to(dtype), x - s * velocity


# ----------------------------------------------------------------------------- samplers


@dataclass
class SamplerState:
    """What a step returns besides x. x0: the step's prediction of the clean sample [B, ...]."""

    x0: Tensor

    def select(self, idx: Tensor) -> SamplerState:
        """Rows idx of every tensor field (for splitting / regrouping batches)."""
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @classmethod
    def cat(cls, states: list[SamplerState]) -> SamplerState:
        return replace(states[0], **{f.name: torch.cat([getattr(s, f.name) for s in states]) for f in fields(states[0])})


@dataclass
class Sampler:
    """Per-step tables of one sampler (device tensors) plus its step rule.

    timesteps: [S] what the model is conditioned on at step i (int64, or float32 for
    Euler / flow matching). ``step(i, x, model_output, state, noise)`` with ``i`` an int or
    a [B] int64 tensor of per-row step indices returns ``(x_next, state)``.
    """

    name: str
    timesteps: Tensor  # [S]
    prediction_type: str
    init_noise_sigma: float

    # Host-side: which steps draw noise, so the sampling loop draws exactly when diffusers does.
    noise_steps: tuple[bool, ...] = ()
    noise_dtype: torch.dtype | None = None  # None: the model output's dtype

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def needs_noise(self, i: int) -> bool:
        return bool(self.noise_steps) and self.noise_steps[i]

    def scale_model_input(self, x: Tensor, i: Index) -> Tensor:
        return x

    def init_state(self, x: Tensor) -> SamplerState:
        return SamplerState(x0=torch.zeros_like(x))

    def step(self, i: Index, x: Tensor, model_output: Tensor, state: SamplerState | None = None, noise: Tensor | None = None):
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Sampler:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **moved)


@dataclass
class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021) as diffusers' DDIMScheduler, or DDIM inversion as DDIMInverseScheduler.

    alpha_t / alpha_prev: [S] alpha_bar of the source / target noise level of step i.
    """

    alpha_t: Tensor = None  # [S]
    alpha_prev: Tensor = None  # [S]
    eta: float = 0.0
    clip_range: float | None = None
    use_clipped_model_output: bool = False

    def step(self, i, x, model_output, state=None, noise=None):
        r = rows(i, x)  # [B]
        x_prev, x0 = ddim_step(
            x, model_output, self.alpha_t[r], self.alpha_prev[r], prediction_type=self.prediction_type,
            eta=self.eta, noise=noise, clip_range=self.clip_range, use_clipped_model_output=self.use_clipped_model_output,
        )
        return x_prev, SamplerState(x0=x0)


@dataclass
class DDPMSampler(Sampler):
    """Ancestral DDPM (Ho et al. 2020) as diffusers' DDPMScheduler (variance_type fixed_small)."""

    alpha_t: Tensor = None  # [S]
    alpha_prev: Tensor = None  # [S]
    clip_range: float | None = None

    def step(self, i, x, model_output, state=None, noise=None):
        r = rows(i, x)  # [B]
        x_prev, x0 = ddpm_step(
            x, model_output, self.alpha_t[r], self.alpha_prev[r], prediction_type=self.prediction_type,
            noise=noise, noise_mask=self.timesteps[r] > 0, clip_range=self.clip_range,
        )
        return x_prev, SamplerState(x0=x0)


@dataclass
class EulerSampler(Sampler):
    """Euler (Karras et al. 2022) as diffusers' EulerDiscreteScheduler. sigmas: [S+1]."""

    sigmas: Tensor = None  # [S+1]

    def scale_model_input(self, x, i):
        s = bcast(self.sigmas[rows(i, x)], x)  # [B, 1, 1, 1]
        return x / ((s**2 + 1) ** 0.5)

    def step(self, i, x, model_output, state=None, noise=None):
        r = rows(i, x)  # [B]
        x_next, x0 = euler_step(x, model_output, self.sigmas[r], self.sigmas[r + 1], prediction_type=self.prediction_type)
        return x_next, SamplerState(x0=x0)


@dataclass
class EulerAncestralSampler(EulerSampler):
    """Euler ancestral as diffusers' EulerAncestralDiscreteScheduler (SDXL-Turbo's): the Euler
    step to sigma_down plus ``noise`` (drawn at every step, as diffusers does) times sigma_up."""

    def step(self, i, x, model_output, state=None, noise=None):
        r = rows(i, x)  # [B]
        up, down = ancestral_sigmas(self.sigmas[r], self.sigmas[r + 1])  # [B] each
        x_next, x0 = euler_step(x, model_output, self.sigmas[r], down, prediction_type=self.prediction_type)
        if noise is not None:
            x_next = (x_next.float() + noise.float() * bcast(up, x_next)).to(x_next.dtype)
        return x_next, SamplerState(x0=x0)


@dataclass
class FlowEulerSampler(Sampler):
    """Rectified-flow Euler (Esser et al. 2024) as diffusers' FlowMatchEulerDiscreteScheduler.
    timesteps = sigmas * num_train_timesteps; sigmas: [S+1]."""

    sigmas: Tensor = None  # [S+1]

    def step(self, i, x, model_output, state=None, noise=None):
        r = rows(i, x)  # [B]
        x_next, x0 = flow_euler_step(x, model_output, self.sigmas[r], self.sigmas[r + 1])
        return x_next, SamplerState(x0=x0)
