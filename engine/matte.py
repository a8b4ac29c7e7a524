"""Chroma-key mattes: an RGBA image from a picture of objects on a key-coloured background.

What a green-screen user does after TKG-DM generation (or any keyed image): a soft alpha from
each pixel's distance to the key colour, then the key's spill taken out of the foreground.

* key: the background's actual colour, the median of the image's border pixels that are
  near the requested key (a generated "green" is rarely (0, 255, 0)); the requested colour
  when no border pixel is near it.
* alpha = clamp((d − lo) / (hi − lo), 0, 1), d the RGB distance to the key in [0, 1] units
  (lo 0.10, hi 0.45): 0 on the background, 1 on objects, a ramp on anti-aliased edges.
* foreground unmixing: a pixel c = α·f + (1 − α)·k gives f = (c − (1 − α)·k) / α, which
  removes the key from edge pixels; then spill suppression (for saturated keys): the key's
  dominant channel is limited to the larger of the other two (the classic despill).
"""

from __future__ import annotations

import torch
from torch import Tensor

KEYS = {"green": (0, 177, 64), "blue": (0, 71, 187)}  # broadcast chroma green and blue, 0..255


def key_rgb(key) -> tuple[float, float, float]:
    """"green" | "blue" | (r, g, b) in 0..255 -> RGB floats in [0, 1]."""
    if isinstance(key, str):
        name = key.strip().lower()
        if name not in KEYS:
            raise ValueError(f"unknown chroma key {key!r}; use 'green', 'blue' or an (r, g, b) triple in 0..255")
        key = KEYS[name]
    try:
        rgb = tuple(float(c) for c in key)
    except TypeError:
        raise ValueError(f"chroma key must be 'green', 'blue' or (r, g, b) in 0..255, got {key!r}") from None
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"chroma key must be three values in 0..255, got {key!r}")
    return tuple(c / 255 for c in rgb)


def estimate_key(image: Tensor, hint, near: float = 0.45, border: int = 2) -> Tensor:
    """image [3, H, W] in [0, 1] -> the background key [3]: median of border pixels near ``hint``."""
    hint_t = torch.tensor(hint, dtype=image.dtype, device=image.device)
    ring = torch.cat([image[:, :border].flatten(1), image[:, -border:].flatten(1),
                      image[:, :, :border].flatten(1), image[:, :, -border:].flatten(1)], dim=1)  # [3, P]
    close = (ring - hint_t[:, None]).norm(dim=0) < near
    return ring[:, close].median(dim=1).values if close.any() else hint_t


def chroma_matte(images: Tensor, key, lo: float = 0.10, hi: float = 0.45, despill: bool = True) -> Tensor:
    """images [B, 3, H, W] in [0, 1] -> RGBA [B, 4, H, W] in [0, 1] (see the module docstring)."""
    if not 0 <= lo < hi:
        raise ValueError(f"the matte needs 0 <= lo < hi, got lo={lo}, hi={hi}")
    hint = key_rgb(key)
    out = []
    for img in images.float():
        k = estimate_key(img, hint)[:, None, None]  # [3, 1, 1]
        d = (img - k).norm(dim=0, keepdim=True)  # [1, H, W]
        alpha = ((d - lo) / (hi - lo)).clamp(0, 1)
        fg = torch.where(alpha > 0, (img - (1 - alpha) * k) / alpha.clamp_min(1e-6), img).clamp(0, 1)
        if despill:
            m = int(k.flatten().argmax())
            others = [c for c in range(3) if c != m]
            kk = k.flatten().sort().values
            if kk[2] - kk[1] > 0.25:  # a saturated key: its dominant channel is the spill
                fg[m] = torch.minimum(fg[m], fg[others].amax(dim=0))
        out.append(torch.cat([fg, alpha]))
    return torch.stack(out)
