"""TKG-DM initial noise (Morita et al. 2025, "TKG-DM: Training-free Chroma Key Content
Generation Diffusion Model", Sec. 3): a background of one key colour, by editing z_T only.

* Channel mean shift (Sec. 3.2): a latent channel c of the noise is shifted by delta, raised
  from 0 in steps of 0.01 until the share of its values with the key's sign has risen by
  ``target_shift`` (the paper's 0.11): z*_c = z_c + sign_c · delta_c. The paper shifts SD's
  channels 1 and 2 upwards for green (``direction = (0, 1, 1, 0)``). Other colours and
  other VAEs: :func:`key_direction` measures the direction on the VAE (the channel means of
  a solid key-colour image's latent: where the key sits relative to the noise's zero mean; for
  a coloured key, without the channels on which the nearest of black, gray and white lies as
  far out), and a channel with weight d_c (|d_c| <= 1) has its share rise by
  ``target_shift · |d_c|``; ±1 weights are the paper's rule.
* Init noise selection (Sec. 3.3): a 2D Gaussian G on [-1, 1] coordinates (std 0.5, centre
  0; both adjustable) keeps the original noise where the object goes and the shifted noise
  around it: z = G · z_T + (1 − G) · z*_T.

Pure functions of tensors (the reference shifts the whole batch's channel at once; here
each image is shifted on its own statistics, so an image's noise does not depend on its
batch neighbours; with one image they agree).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

log = logging.getLogger(__name__)

TARGET_SHIFT = 0.11  # the paper's rise of the positive-value ratio
STEP = 0.01  # the paper's shift increment
SD_CHANNELS = (1, 2)  # the channels the paper shifts (SD's VAE)
SD_SCALING_FACTORS = (0.18215, 0.13025)  # SD1.x/2.x and SDXL VAEs: where the paper's channels apply


def shift_channel(z: Tensor, sign: float, target_shift: float = TARGET_SHIFT, step: float = STEP) -> Tensor:
    """One channel z [h, w] shifted by sign·delta, the smallest delta in 0, step, 2·step, ... (as
    the paper accumulates it) for which the share of values of that sign rises by ``target_shift``."""
    zs = z * sign  # the key's sign made positive
    target = float((zs > 0).float().mean()) + target_shift
    if target > 1.0:
        raise ValueError(f"target_shift {target_shift} asks for more than all values of one sign; use a smaller shift")
    delta = 0.0
    while float(((zs + delta) > 0).float().mean()) < target:
        delta += step
    return z + sign * delta


def channel_mean_shift(z: Tensor, direction, target_shift: float = TARGET_SHIFT, step: float = STEP) -> Tensor:
    """z [B, C, h, w] -> z* with every channel c where direction[c] != 0 shifted (per image),
    its share of values of the sign of direction[c] rising by target_shift · |direction[c]|."""
    if len(direction) != z.shape[1]:
        raise ValueError(f"the chroma direction has {len(direction)} entries for {z.shape[1]} latent channels")
    try:
        weights = [float(d) for d in direction]
    except (TypeError, ValueError):
        weights = [math.nan]
    if not all(-1.0 <= d <= 1.0 for d in weights):  # NaN fails too
        raise ValueError(f"the chroma direction's entries are weights in [-1, 1], one per latent channel; got "
                         f"{list(direction)}")
    out = z.clone()
    for b in range(z.shape[0]):
        for c, d in enumerate(weights):
            if d:
                out[b, c] = shift_channel(z[b, c], 1.0 if d > 0 else -1.0, target_shift * abs(d), step)
    return out


def gaussian_mask(h: int, w: int, std: float = 0.5, center=(0.0, 0.0), device=None) -> Tensor:
    """G [h, w]: exp(−((x − cx)² + (y − cy)²) / (2 std²)) on a grid of [-1, 1] coordinates
    (1 at the centre, decaying to the border). ``std`` sets the object's region size; a pair
    (std_x, std_y) makes it elliptical."""
    sx, sy = (std, std) if isinstance(std, (int, float)) else std
    if min(sx, sy) <= 0:
        raise ValueError(f"the mask's std must be positive, got {std!r}")
    y = torch.linspace(-1, 1, h, device=device)[:, None]
    x = torch.linspace(-1, 1, w, device=device)[None, :]
    cx, cy = center
    return torch.exp(-((x - cx) ** 2 / (2 * sx ** 2) + (y - cy) ** 2 / (2 * sy ** 2)))


def tkg_noise(z: Tensor, direction, *, target_shift: float = TARGET_SHIFT, std=0.5, center=(0.0, 0.0)) -> Tensor:
    """TKG-DM's initial noise: G · z + (1 − G) · channel_mean_shift(z)."""
    g = gaussian_mask(z.shape[-2], z.shape[-1], std, center, z.device).to(z.dtype)  # [h, w]
    return g * z + (1 - g) * channel_mean_shift(z, direction, target_shift)


NEUTRALS = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "white": (1.0, 1.0, 1.0)}
ACHROMATIC = 0.15  # a key whose RGB channels all lie within this of each other is a neutral itself


def solid_latent_mean(encode, rgb, size: int) -> Tensor:
    """The channel means [C] of encode(a solid size x size image of ``rgb``)."""
    image = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size)  # [1, 3, s, s]
    return encode(image).float().mean((0, 2, 3)).cpu()  # [C]


def key_direction(encode, colour_rgb, size: int = 64, floor: float = 0.2) -> list[float]:
    """Per-channel weights in [-1, 1] that move the noise towards ``colour_rgb`` (floats in
    [0, 1]) and, for a coloured key, away from the achromatic colour nearest it. ``encode``
    maps images [1, 3, size, size] in [0, 1] to latents [1, C, h, w]; only the VAE is used
    (one image at a time, so an SDXL-sized VAE's memory stays that of one encode).

    The key's latent k (the channel means of a solid key image, in scaled latents, whose centre
    is the noise's zero mean) gives the direction the paper shifts towards. For a coloured key,
    a channel on which the nearest neutral n (black, gray or white; nearest in latent space)
    lies at least as far out as the key, sign(k_c - n_c) != sign(k_c), pulls the noise towards
    n as much as towards the key, so it is left unshifted: keeping it made green backgrounds
    black on the shapes-v2 VAE, where green and black share every channel's sign and differ on
    the brightness channel. A neutral key lies on that axis itself and keeps every channel. The
    kept channels are weighted by k_c over the largest kept |k_c|; weights under ``floor`` are
    0. Where no channel separates the key from its neutral, every channel of k is kept (with a
    warning: the background may come out as that neutral)."""
    rgb = tuple(float(v) for v in colour_rgb)
    shown = ",".join(str(round(v * 255)) for v in rgb)  # as the user gives it: R,G,B in 0..255
    coloured = max(rgb) - min(rgb) > ACHROMATIC
    k = solid_latent_mean(encode, rgb, size)  # [C]
    if float(k.abs().max()) < 1e-6:
        raise ValueError(f"the chroma key {shown} encodes to the noise's centre on this VAE, so no shift moves "
                         f"towards it: give the direction yourself, one weight in [-1, 1] per latent channel "
                         f"(chroma_direction=[...], CLI --chroma-direction W,W,...)")
    d = k
    if coloured:
        neutral = torch.stack([solid_latent_mean(encode, n, size) for n in NEUTRALS.values()])  # [3, C]
        i = int((neutral - k).norm(dim=1).argmin())
        name = list(NEUTRALS)[i]
        keep = (torch.sign(k - neutral[i]) == torch.sign(k)) & (k != 0)  # [C]
        if keep.any():
            d = torch.where(keep, k, torch.zeros_like(k))
        else:
            log.warning("the chroma key %s lies no further out than %s on any latent channel of this VAE: the "
                        "background may come out %s; chroma_direction= (CLI --chroma-direction) chooses the channels",
                        shown, name, name)
    d = d / d.abs().max()
    return [float(x) if abs(float(x)) >= floor else 0.0 for x in d]
