"""What the optimisation-based methods share (null-text inversion, Imagic, pix2pix-zero):
gradients through the executor for a while, embeddings as float32 parameters, and the
standard DDPM training loss.

The executor is inference-first: parameters are frozen and the loop runs without autograd.
A method that needs gradients takes them inside :func:`trainable` (autograd on, activation
checkpointing per UNet block when asked: SDXL's activations do not fit otherwise) and keeps
what it optimises in float32 (null-text and ReNoise give NaN in half precision). The seam
then takes the differentiable attention path (``kernels.needs_grad``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from ..prompts import Conditioning


@contextmanager
def trainable(unet, checkpointing: bool = False):
    """Autograd on (the loop runs under ``no_grad``), and the UNet's activation checkpointing
    set to ``checkpointing`` for the duration (restored after)."""
    before = unet.gradient_checkpointing
    unet.gradient_checkpointing = checkpointing
    try:
        with torch.enable_grad():
            yield
    finally:
        unet.gradient_checkpointing = before


def default_checkpointing(denoiser, checkpointing: bool | None) -> bool:
    """The caller's choice, else on for SDXL-sized UNets (two text encoders)."""
    return bool(denoiser.sdxl) if checkpointing is None else bool(checkpointing)


def parameters(cond: Conditioning) -> Conditioning:
    """A float32 leaf copy of ``cond`` whose tensors require grad (pooled too, when present)."""
    pooled = None if cond.pooled is None else cond.pooled.detach().float().clone().requires_grad_()
    return Conditioning(cond.context.detach().float().clone().requires_grad_(), pooled)


def tensors(cond: Conditioning) -> list[Tensor]:
    return [cond.context] + ([] if cond.pooled is None else [cond.pooled])


def detached(cond: Conditioning) -> Conditioning:
    return Conditioning(cond.context.detach(), None if cond.pooled is None else cond.pooled.detach())


def noise_loss(denoiser, schedule, x0: Tensor, cond: Conditioning, height: int, width: int,
               generator: torch.Generator | None = None) -> Tensor:
    """The DDPM training loss (Ho et al. 2020, eq. 14) at one random timestep per image:
    ``|| eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, cond) ||^2`` (v-prediction models:
    the target is v). x0 [B, C, h, w] float32; returns a float32 scalar."""
    b, dev = x0.shape[0], x0.device
    n = int(schedule.alphas_cumprod.shape[0])
    t = torch.randint(0, n, (b,), generator=generator).to(dev)  # [B]
    eps = torch.randn(x0.shape, generator=generator).to(dev)  # [B, C, h, w]
    a = schedule.alphas_cumprod.to(dev, torch.float32)[t].view(b, 1, 1, 1)  # [B, 1, 1, 1]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = denoiser(xt, t, denoiser.condition(cond, height, width)).float()  # [B, C, h, w]
    target = eps if schedule.config.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    return (out - target).square().mean()
