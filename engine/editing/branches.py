"""Two-branch edits: the inverted image under its own prompt (the source branch) and under
the target prompt (the edit branch), side by side in one program, so the edit can read the
source's attention or features at every step (Prompt-to-Prompt, MasaCtrl).

Sample rows are [source x B, edit x B]; with guidance the model rows are
[uncond_src, uncond_edit, cond_src, cond_edit]. :class:`BranchEdit` runs them on the
inversion's replay sampler, hands out one precomputed plan per step and, with
``source="inversion"``, resets the source rows to the inversion's stored trajectory after
every update; subclasses add what follows the update (P2P's local blend, MasaCtrl's masks).
"""

from __future__ import annotations

import torch

from ..prompts import Conditioning, as_list
from ..step import Guidance, SamplerProgram, stored_noise

SOURCES = ("denoise", "inversion")


def branch_prompts(inv, target_prompt, B: int) -> tuple[list[str], list[str]]:
    """(source prompts, target prompts), one per image; the target defaults to the source."""
    sources = as_list(inv.settings.get("prompt", ""), B, "inversion prompt")
    return sources, as_list(sources if target_prompt is None else target_prompt, B, "target_prompt")


def branch_guidance(pipe, inv, sources, targets, guidance_scale: float, source_guidance_scale: float,
                    negative_prompt=None, image_prompt=None) -> Guidance:
    """Guidance of the 2B sample rows [source x B, edit x B]: per-row scales when the source
    is guided differently; unconditional rows (the inversion's, unless a negative prompt
    is given) only when either scale exceeds 1. ``image_prompt``: IP-Adapter tokens both
    branches read (a Tight Inversion's image)."""
    B, dev = len(sources), pipe.device
    src = inv.source if len(inv.source) == B else pipe.encode_prompt(sources, guidance=False)[0]
    target = pipe.encode_prompt(targets, guidance=False)[0]
    both = Conditioning.cat([src, target]).to(dev, pipe.dtype)  # [2B, ...]
    ip = image_prompt
    both = both.with_image(None if ip is None else ip.cond.repeat(2, 1, 1), None if ip is None else ip.scale)
    cfg = max(guidance_scale, source_guidance_scale) > 1.0
    uncond = None
    if cfg:
        neg = inv.settings.get("negative_prompt") if negative_prompt is None else negative_prompt
        uncond = inv.uncond
        if negative_prompt is not None or uncond is None or len(uncond) != B:
            uncond = pipe.encode_prompt(sources, neg, guidance=True)[1]
        uncond = Conditioning.cat([uncond, uncond]).to(dev, pipe.dtype)
        uncond = uncond.with_image(None if ip is None else ip.uncond.repeat(2, 1, 1), None if ip is None else ip.scale)
    scale = guidance_scale if cfg else 1.0
    if cfg and source_guidance_scale != guidance_scale:  # per-row scales: [source x B, edit x B]
        scale = torch.tensor([float(source_guidance_scale)] * B + [float(guidance_scale)] * B, device=dev)
    return Guidance(both, uncond, None, scale)  # SDXL time ids: the Denoiser's, from the image size


class BranchEdit(SamplerProgram):
    """Source and edit branches as one program (see the module docstring); ``plans[k]`` is
    the attention plan of the k-th step run."""

    def __init__(self, pipe, g: Guidance, rp, plans: list, source: str = "denoise", callback=None,
                 uncond_steps: list | None = None):
        if source not in SOURCES:
            raise ValueError(f"source must be 'denoise' or 'inversion', got {source!r}")
        b = rp.x.shape[0]
        noise = None if rp.noise is None else stored_noise(rp.noise, rp.first, copies=2)  # both branches
        h, w = rp.x.shape[-2:]
        f = pipe.vae_scale_factor
        super().__init__(pipe.denoiser, g, torch.cat([rp.x, rp.x]), rp.sampler, height=h * f, width=w * f,
                         start=rp.first + rp.start, noise=noise, callback=callback, uncond_steps=uncond_steps)
        self.b, self.i0, self.rp, self.plans, self.source = b, rp.first + rp.start, rp, plans, source

    @property
    def cond_row0(self) -> int:
        """First model row of the conditional source rows."""
        return 2 * self.b if self.g.guided else 0

    def plan(self):
        return self.plans[self.i - self.i0]

    def after_update(self, i):
        if self.source == "inversion":  # the inversion's exact trajectory
            k = i - self.i0
            self.x = torch.cat([self.rp.latents[self.rp.start + k + 1], self.x[self.b:]])

    def report(self, i):
        return dict(i=i - self.i0, t=self.sampler.timesteps[i].expand(2 * self.b), x=self.x)

    def result(self):
        return self.x[self.b:]
