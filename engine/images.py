"""Conversions between image tensors in [0, 1] and what users hand in or get back."""

from __future__ import annotations

import numpy as np
import torch

OUTPUT_TYPES = ("pil", "np", "pt")


def to_output(images: torch.Tensor, output_type: str = "pil"):
    """images [B, 3, H, W] in [0, 1] -> list of PIL images, an array [B, H, W, 3], or the tensor."""
    if output_type == "pt":
        return images
    arr = images.detach().float().permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
    if output_type == "np":
        return arr
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
    raise ValueError(f"unknown output_type {output_type!r}; use one of {OUTPUT_TYPES}")
