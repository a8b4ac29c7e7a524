"""DPM-Solver++ multistep (2M and SDE) with explicit per-row multistep state.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models": data-prediction solver in lambda = log(alpha / sigma); order 2 multistep
(Algorithm 2, "2M"), and its SDE variant (sec. 5 / Gonzalez et al. 2023,
``sde-dpmsolver++``) used by LEDITS++. Arithmetic follows diffusers'
DPMSolverMultistepScheduler. The history (previous x0 prediction and lambda) is carried per
row in `DPMState`, so rows may be at different steps and a row with no history takes a
first-order step, like diffusers' first step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .samplers import Sampler, SamplerState, bcast, rows


@dataclass
class DPMState(SamplerState):
    """x0: previous x0 prediction [B, ...] (float32); lam: its lambda [B]; has_prev: [B] bool."""

    lam: Tensor = None  # [B]
    has_prev: Tensor = None  # [B] bool


def init_dpm_state(x: Tensor) -> DPMState:
    b = x.shape[0]
    return DPMState(
        x0=torch.zeros_like(x, dtype=torch.float32),
        lam=torch.zeros(b, dtype=torch.float32, device=x.device),
        has_prev=torch.zeros(b, dtype=torch.bool, device=x.device),
    )


def vp_alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """VE sigma -> VP (alpha_t, sigma_t) with alpha_t^2 + sigma_t^2 = 1."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def dpmpp_2m_step(
    x: Tensor,
    model_output: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    state: DPMState,
    *,
    prediction_type: str = "epsilon",
    sde: bool = False,
    noise: Tensor | None = None,
    first_order: Tensor | None = None,
    solver_type: str = "midpoint",
    solver_order: int = 2,
) -> tuple[Tensor, DPMState]:
    """One DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2), or SDE-DPM-Solver++(2M) if ``sde``.

    x, model_output: [B, ...]; sigma, sigma_next: [B] VE noise levels of this / the next step.
    first_order: [B] bool, rows forced to the first-order update (besides rows without history).
    Returns (x_next, new state); new_state.x0 is this step's x0 prediction. x_next has the
    wider of x's and model_output's dtypes (a float32 latent stays float32).
    """
    dtype = torch.promote_types(x.dtype, model_output.dtype)
    alpha_s0, sigma_s0 = vp_alpha_sigma(sigma)  # [B]
    alpha_t, sigma_t = vp_alpha_sigma(sigma_next)  # [B]
    a_s0, s_s0 = bcast(alpha_s0, x), bcast(sigma_s0, x)  # [B, 1, 1, 1]
    if prediction_type == "epsilon":
        x0 = (x - s_s0 * model_output) / a_s0
    elif prediction_type == "v_prediction":
        x0 = a_s0 * x - s_s0 * model_output
    elif prediction_type == "sample":
        x0 = model_output
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    x = x.float()
    if sde and noise is None:
        raise ValueError("sde-dpmsolver++ needs noise")

    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # [B]; +inf at sigma_next = 0
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)  # [B]
    h = lambda_t - lambda_s0  # [B]
    ratio = sigma_t / sigma_s0  # [B]
    if sde:
        c_x = bcast(ratio * torch.exp(-h), x)  # [B, 1, 1, 1]
        c_d = bcast(alpha_t * (1 - torch.exp(-2.0 * h)), x)
        c_noise = bcast(sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)), x)
        x1 = c_x * x + c_d * x0 + c_noise * noise  # [B, C, H, W] first-order update
    else:
        c_x = bcast(ratio, x)
        x1 = c_x * x - bcast(alpha_t * (torch.exp(-h) - 1.0), x) * x0  # [B, C, H, W]
    if solver_order == 1:
        return x1.to(dtype), DPMState(x0=x0, lam=lambda_s0, has_prev=torch.ones_like(state.has_prev))

    r0 = (lambda_s0 - state.lam) / h  # [B] h_0 / h
    d1 = bcast(1.0 / r0, x) * (x0 - state.x0)  # [B, C, H, W]
    if sde:
        if solver_type == "midpoint":
            c_d1 = 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h)))
        else:
            c_d1 = alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        x2 = c_x * x + c_d * x0 + bcast(c_d1, x) * d1 + c_noise * noise
    else:
        e = alpha_t * (torch.exp(-h) - 1.0)
        if solver_type == "midpoint":
            x2 = c_x * x - bcast(e, x) * x0 - bcast(0.5 * e, x) * d1
        else:
            x2 = c_x * x - bcast(e, x) * x0 + bcast(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0), x) * d1
    use_first = ~state.has_prev if first_order is None else (~state.has_prev | first_order)  # [B]
    x_next = torch.where(bcast(use_first, x), x1, x2)  # NaNs of the unused branch are dropped
    return x_next.to(dtype), DPMState(x0=x0, lam=lambda_s0, has_prev=torch.ones_like(state.has_prev))


@dataclass
class DPMSolverSampler(Sampler):
    """DPM-Solver++ multistep as diffusers' DPMSolverMultistepScheduler (orders 1-2).

    sigmas: [S+1] VE sigmas, the last one per final_sigmas_type. final_first_order: diffusers'
    lower_order_final rule for the last step (euler_at_final, < 15 steps, or a zero final sigma).
    """

    sigmas: Tensor = None  # [S+1]
    sde: bool = False
    solver_type: str = "midpoint"
    solver_order: int = 2
    final_first_order: bool = True

    def init_state(self, x: Tensor) -> DPMState:
        return init_dpm_state(x)

    def step(self, i, x, model_output, state=None, noise=None):
        r = rows(i, x)  # [B]
        state = init_dpm_state(x) if state is None else state
        first = (r == len(self) - 1) if self.final_first_order else None  # [B]
        return dpmpp_2m_step(
            x, model_output, self.sigmas[r], self.sigmas[r + 1], state, prediction_type=self.prediction_type,
            sde=self.sde, noise=noise, first_order=first, solver_type=self.solver_type, solver_order=self.solver_order,
        )
