"""What every editing method shares: image size, per-image prompts, running one program."""

from __future__ import annotations

import torch

from ..prompts import as_list
from ..step import run


def image_size(pipe, x0) -> tuple[int, int]:
    f = pipe.vae_scale_factor
    return x0.shape[-2] * f, x0.shape[-1] * f


def guidance_for(pipe, prompt, negative_prompt, scale, height, width, rows: int, image=None):
    """Guidance for ``rows`` images: one prompt for all of them, or one prompt per image;
    ``image``: an :class:`~engine.image_prompt.ImagePrompt` the rows also read (Tight Inversion)."""
    prompt = as_list("" if prompt is None else prompt)  # None: unconditional
    n = len(prompt)
    if n not in (1, rows):
        raise ValueError(f"{n} prompts for {rows} images; give one prompt, or one per image")
    return pipe.guidance(prompt, negative_prompt, scale, height, width, num_images=rows // n).with_image(image)


@torch.no_grad()
def run_one(pipe, program, progress: bool = True):
    """Run one program through the one loop on the pipeline's denoiser; its result."""
    return run([program], pipe.denoiser, progress=progress)[0]
