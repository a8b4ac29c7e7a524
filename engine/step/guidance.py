"""Classifier-free guidance as a component: which rows are unconditional, and how the
model's outputs for a program's rows combine into one prediction per sample.

Ho & Salimans 2022, "Classifier-Free Diffusion Guidance": eps = eps_u + s (eps_c - eps_u).
The scale may differ per sample row (a [B] tensor): the source and target rows of one
edit can be guided differently, as the official Edit-Friendly DDPM + Prompt-to-Prompt
recipe does (3.5 for the source, 15 for the target).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..prompts import Conditioning


@dataclass
class Guidance:
    """Text conditioning of B sample rows, with or without classifier-free guidance.

    ``uncond`` None: no guidance, one model row per sample. Otherwise the model runs 2B
    rows, [uncond, cond], and :meth:`combine` mixes them with ``scale`` (a float, or a [B]
    tensor of per-row scales) and ``rescale`` (Lin et al. 2024, Sec. 3.4).
    """

    cond: Conditioning  # [B, ...]
    uncond: Conditioning | None  # [B, ...]
    time_ids: Tensor | None  # [B, 6] SDXL micro-conditioning (kept for callers that build it)
    scale: float | Tensor = 1.0  # float or [B]
    rescale: float = 0.0

    def __len__(self) -> int:
        return len(self.cond)

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    def model_conditioning(self) -> Conditioning:
        """The conditioning of the model rows: [uncond, cond] (2B) or cond (B)."""
        return self.cond if self.uncond is None else Conditioning.cat([self.uncond, self.cond])

    def with_image(self, prompt) -> "Guidance":
        """The same guidance with an image prompt (:class:`~engine.editing.tight.ImagePrompt` or
        None): conditional rows read its tokens, unconditional rows its null-image tokens (as
        diffusers' IP-Adapter pipelines), both at its scale."""
        if prompt is None:
            return self
        cond = self.cond.with_image(prompt.cond, prompt.scale)
        uncond = None if self.uncond is None else self.uncond.with_image(prompt.uncond, prompt.scale)
        return Guidance(cond, uncond, self.time_ids, self.scale, self.rescale)

    def tile(self, n: int) -> "Guidance":
        """The same guidance for n blocks of rows (e.g. n timesteps of B images in one call)."""
        ids = None if self.time_ids is None else self.time_ids.repeat(n, 1)
        scale = self.scale.repeat(n) if isinstance(self.scale, Tensor) and self.scale.ndim else self.scale
        return Guidance(self.cond.tile(n), None if self.uncond is None else self.uncond.tile(n), ids,
                        scale, self.rescale)

    def scale_rows(self, device) -> Tensor:
        """[B] float32 per-row scale (a float scale broadcast)."""
        s = self.scale if isinstance(self.scale, Tensor) else torch.tensor(float(self.scale))
        return s.to(device, torch.float32).expand(len(self)).contiguous()

    def combine(self, out: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """Model output of the model rows -> guided prediction [B, ...] (float32 with guidance)."""
        if self.uncond is None:
            return out
        return cfg_combine(out, self.scale if scale is None else scale, self.rescale)


def cfg_combine(out: Tensor, scale, rescale=0.0, keep=None) -> Tensor:
    """Classifier-free guidance of a model output [2B, ...] whose rows are [uncond, cond];
    returns [B, ...] in float32 (the difference of two close half-precision outputs, times
    the scale, is where half precision hurts).

    ``scale``: a float, a 0-dim float32 tensor, or [B] per-row scales (same results as
    the float for equal values). ``rescale``: a float (0 skips it) or a 0-dim tensor;
    ``keep``: 1 - rescale, rounded from double like the float expression (for tensors).
    """
    uncond, cond = out.float().chunk(2)  # [B, ...] each
    if isinstance(scale, Tensor) and scale.ndim == 1:
        scale = scale.view(-1, *([1] * (cond.ndim - 1)))  # [B, 1, 1, 1]
    guided = uncond + scale * (cond - uncond)
    if isinstance(rescale, Tensor) or rescale > 0:
        guided = rescale_guidance(guided, cond, rescale, keep)
    return guided


def rescale_guidance(guided: Tensor, ref: Tensor, rescale, keep=None) -> Tensor:
    """Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Sec. 3.4:
    mix ``guided`` with itself rescaled to the per-row standard deviation of ``ref``."""
    dims = list(range(1, ref.ndim))
    rescaled = guided * (ref.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + ((1 - rescale) if keep is None else keep) * guided
