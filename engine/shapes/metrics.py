"""Image-quality metrics for edit evaluation: PSNR, SSIM and masked (background) PSNR.

All functions take RGB images as uint8 [H, W, 3] (scaled to [0, 1]) or float
arrays/tensors already in [0, 1], HWC or CHW. PSNR of identical images is
capped at ``PSNR_CAP`` dB so averages stay finite.
"""

from __future__ import annotations

import numpy as np

PSNR_CAP = 100.0


def to_float01(image) -> np.ndarray:
    """float64 [H, W, C] in [0, 1] from uint8 or float input, HWC or CHW."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image)
    integer = np.issubdtype(a.dtype, np.integer)
    a = a.astype(np.float64)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    return a / 255.0 if integer else a


def _psnr_from_mse(mse: float) -> float:
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else float(min(PSNR_CAP, -10.0 * np.log10(mse)))


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB (peak 1.0)."""
    x, y = to_float01(a), to_float01(b)
    return _psnr_from_mse(float(((x - y) ** 2).mean()))


def masked_psnr(a, b, mask) -> float:
    """PSNR over pixels where ``mask`` is False (e.g. the background outside an edit region).

    ``mask`` is bool [H, W]; True marks pixels to exclude. Returns PSNR_CAP when
    nothing is left to compare.
    """
    x, y = to_float01(a), to_float01(b)
    keep = ~np.asarray(mask, bool)
    if not keep.any():
        return PSNR_CAP
    return _psnr_from_mse(float(((x - y) ** 2)[keep].mean()))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def _filter(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filtering of [H, W, C]."""
    k = len(g)
    h, w = img.shape[:2]
    rows = sum(g[i] * img[i:h - k + 1 + i] for i in range(k))  # [H-k+1, W, C]
    return sum(g[i] * rows[:, i:w - k + 1 + i] for i in range(k))  # [H-k+1, W-k+1, C]


def ssim(a, b, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window 11/1.5, K1=0.01, K2=0.03,
    data range 1, computed per channel and averaged over channels and valid positions."""
    x, y = to_float01(a), to_float01(b)
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {x.shape} vs {y.shape}")
    window = min(window, x.shape[0], x.shape[1])
    g = _gaussian_window(window, sigma)
    c1, c2 = 0.01**2, 0.03**2
    mx, my = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mx * mx
    syy = _filter(y * y, g) - my * my
    sxy = _filter(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())
