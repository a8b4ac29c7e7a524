"""Noise regularisation of an inversion's noise predictions (Parmar et al. 2023, "Zero-shot
Image-to-Image Translation", Sec. 3.1; reused by ReNoise, Garibi et al. 2024).

DDIM inversion's noise predictions drift from the statistics of Gaussian noise, and the
inverted latent then edits poorly. Before each inversion update the predicted noise ε is
pushed, by a few gradient steps on ε alone (no model call), towards

* no spatial auto-correlation: L_pair = Σ_levels (mean(ε · roll(ε, r, H))² + mean(ε · roll(ε, r, W))²),
  r random in [0, side/2), over a pyramid of 2x average-pooled copies down to 8 pixels,
  every image and channel on its own;
* a standard normal: L_KL = var(ε) + mean(ε)² − 1 − log var(ε) per image;

ε ← ε − λ_ac ∇L_pair / rolls (``rolls`` random shifts per step) − λ_kl ∇L_KL, ``steps`` times.
Defaults as pix2pix-zero (λ_ac = λ_kl = 20, 5 steps, 5 rolls). Each image's losses are its
own (the reference takes the KL term's mean and variance over the whole batch), so a batch
regularises as its images would alone, up to the shifts drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sampling.samplers import pred_x0_eps


@dataclass(frozen=True)
class NoiseRegulariser:
    lambda_ac: float = 20.0
    lambda_kl: float = 20.0
    steps: int = 5
    rolls: int = 5

    def __post_init__(self):
        if self.lambda_ac < 0 or self.lambda_kl < 0 or self.steps < 0 or self.rolls < 1:
            raise ValueError("noise regularisation needs lambda_ac, lambda_kl >= 0, steps >= 0 and rolls >= 1")

    @property
    def active(self) -> bool:
        return self.steps > 0 and (self.lambda_ac > 0 or self.lambda_kl > 0)

    def __call__(self, out: Tensor, x: Tensor, alpha_t: Tensor, prediction_type: str,
                 generator: torch.Generator | None = None) -> Tensor:
        """The regularised model output [B, C, h, w] (float32) for the input x at alpha_bar_t [B]."""
        out = out.detach().float()
        a = alpha_t.view(-1, 1, 1, 1).float()  # [B, 1, 1, 1]
        with torch.enable_grad():
            for _ in range(self.steps):
                if self.lambda_ac > 0:
                    for _ in range(self.rolls):
                        out = out - self.lambda_ac / self.rolls * _grad(out, x, a, prediction_type,
                                                                        lambda e: autocorrelation_loss(e, generator))
                if self.lambda_kl > 0:
                    out = out - self.lambda_kl * _grad(out, x, a, prediction_type, kl_loss)
        return out.detach()


def _grad(out: Tensor, x: Tensor, a: Tensor, prediction_type: str, loss_fn) -> Tensor:
    """d loss(eps(out)) / d out, each image's loss on its own."""
    var = out.detach().requires_grad_()
    eps = pred_x0_eps(x.float(), var, a, prediction_type)[1]  # [B, C, h, w]
    (grad,) = torch.autograd.grad(loss_fn(eps).sum(), var)
    return grad


def autocorrelation_loss(eps: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per image [B]: pairwise auto-correlation of every channel at a random shift per pyramid
    level, summed over channels and levels. Shifts are drawn per image, channel and level in
    that order (the reference's order: one generator gives the same shifts)."""
    per_image = []
    for b in range(eps.shape[0]):
        total = eps.new_zeros(())
        for c in range(eps.shape[1]):
            n = eps[b:b + 1, c:c + 1]  # [1, 1, h, w]
            while True:
                r = int(torch.randint(max(n.shape[2] // 2, 1), (1,), generator=generator))
                total = total + (n * torch.roll(n, shifts=r, dims=2)).mean() ** 2
                total = total + (n * torch.roll(n, shifts=r, dims=3)).mean() ** 2
                if n.shape[2] <= 8:
                    break
                n = F.avg_pool2d(n, kernel_size=2)
        per_image.append(total)
    return torch.stack(per_image)  # [B]


def kl_loss(eps: Tensor) -> Tensor:
    """Per image [B]: KL divergence of N(mean, var) of its values from N(0, 1) (up to a factor 2)."""
    flat = eps.flatten(1)  # [B, N]
    mean, var = flat.mean(1), flat.var(1)
    return var + mean ** 2 - 1 - torch.log(var + 1e-7)
