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


MAX_PIXELS = 4096 * 4096  # refuse decompression bombs before decoding


def load_image(image, max_pixels: int = MAX_PIXELS):
    """A path, PIL image, uint8 array [H, W, 3] or float tensor [3, H, W] / [B, 3, H, W] in [0, 1]
    -> float32 tensor [B, 3, H, W] in [0, 1]. Never modifies what it is given."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {str(path)!r} does not exist")
        try:
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:  # checked before the pixels are decoded
                    raise ValueError(f"image {path} is {im.width}x{im.height}, over the {max_pixels} pixel limit; downscale it first")
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
    if isinstance(image, Image.Image):
        if image.width * image.height > max_pixels:
            raise ValueError(f"image is {image.width}x{image.height}, over the {max_pixels} pixel limit; downscale it first")
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image array must be [H, W, 3], got shape {image.shape}")
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        image = torch.tensor(image).permute(2, 0, 1).float() / scale  # a copy: arrays may be read-only
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a path, PIL image, array or tensor, got {type(image).__name__}")
    x = image.unsqueeze(0) if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"image tensor must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
    return x.float().clone()
