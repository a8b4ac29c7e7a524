"""Semantic guidance (SEGA) with LEDITS++'s implicit masks, as batched tensor math.

SEGA (Brack et al. 2023, "SEGA: Instructing Text-to-Image Models using Semantic
Guidance", eq. 3-6) adds, per edit concept c, a guidance term
``s_c * (eps_c - eps_uncond)`` (sign flipped for a reverse edit) restricted to a mask.
LEDITS++ (Brack et al. 2024, "LEDITS++: Limitless Image Editing using Text-to-Image
Models", Sec. 3.3) builds that mask from two implicit sources:

* M¹ (cross-attention): the concept's cross-attention maps at 1/4 of the latent
  resolution, averaged over layers and heads, summed over the concept's tokens,
  smoothed (3x3 Gaussian), thresholded at the ``edit_threshold`` quantile;
* M² (noise): the channel-summed magnitude of the guidance term, thresholded at the
  same quantile; the edit mask is M¹ ∧ M² ("intersect"), or either alone.

Everything runs on all concepts at once ([n, B, ...] tensors); quantiles are tensor ops,
so a denoising step has no host sync. The arithmetic follows diffusers'
``LEditsPPPipelineStableDiffusion(XL).__call__`` so results agree to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.attention import Attention


def _per_concept(value, n: int, name: str) -> list:
    """A scalar (same for every concept) or a list with one entry per concept."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} editing prompts")
        return list(value)
    return [value] * n


@dataclass
class Concepts:
    """Per-concept SEGA settings (diffusers' scalar-or-list parameters, expanded).

    scale: edit_guidance_scale; threshold: edit_threshold (a quantile in [0, 1]);
    reverse: reverse_editing_direction; warmup / cooldown: the concept applies at denoising
    steps warmup <= i < cooldown (cooldown None: to the end).
    """

    scale: list[float]
    threshold: list[float]
    reverse: list[bool]
    warmup: list[int]
    cooldown: list[int | None]

    @classmethod
    def from_params(cls, n: int, edit_guidance_scale=5.0, edit_threshold=0.9, reverse_editing_direction=False,
                    edit_warmup_steps=0, edit_cooldown_steps=None) -> "Concepts":
        c = cls(
            [float(s) for s in _per_concept(edit_guidance_scale, n, "edit_guidance_scale")],
            [float(t) for t in _per_concept(edit_threshold, n, "edit_threshold")],
            [bool(r) for r in _per_concept(reverse_editing_direction, n, "reverse_editing_direction")],
            [int(w) for w in _per_concept(edit_warmup_steps, n, "edit_warmup_steps")],
            [None if s is None else int(s) for s in _per_concept(edit_cooldown_steps, n, "edit_cooldown_steps")],
        )
        bad = [t for t in c.threshold if not 0.0 <= t <= 1.0]
        if bad:
            raise ValueError(f"edit_threshold must be in [0, 1] (a quantile), got {bad}")
        return c

    def signed_scale(self, device, dtype) -> Tensor:
        """[n] guidance scale with the direction's sign."""
        return torch.tensor([-s if r else s for s, r in zip(self.scale, self.reverse)], device=device, dtype=dtype)

    def active(self, steps: int, device, dtype) -> Tensor:
        """[S, n] 1.0 where concept c guides denoising step i (warm-up / cool-down window)."""
        rows = [[float(w <= i and (cd is None or i < cd)) for w, cd in zip(self.warmup, self.cooldown)]
                for i in range(steps)]
        return torch.tensor(rows, device=device, dtype=dtype).reshape(steps, len(self.scale))


# ----------------------------------------------------------------------------- quantiles


def row_quantile(x: Tensor, q: Tensor) -> Tensor:
    """x [N, M], q [N] -> [N]: row r's q[r]-quantile with linear interpolation.

    Same arithmetic as ``torch.quantile(x[r], q[r])`` (sort, rank q*(M-1), lerp between
    the neighbours), but a different q per row in one call and no host sync."""
    m = x.shape[-1]
    srt = x.sort(dim=-1).values  # [N, M]
    ranks = q.to(x.dtype) * (m - 1)  # [N]
    below = ranks.long()  # truncation, as torch.quantile
    above = ranks.ceil().long()
    lo = srt.gather(-1, below[:, None])[:, 0]  # [N]
    hi = srt.gather(-1, above[:, None])[:, 0]  # [N]
    return torch.lerp(lo, hi, ranks - below.to(x.dtype))


# ----------------------------------------------------------------------------- M¹: cross-attention


def smoothing_kernel(device) -> Tensor:
    """[1, 1, 3, 3] the Gaussian of diffusers' ``LeditsGaussianSmoothing`` (sigma 0.5).

    It evaluates exp(-((x - mean) / (2 sigma))^2) per axis (not the textbook
    exp(-(x - mean)^2 / (2 sigma^2))); kept as is so masks agree with diffusers."""
    size, sigma = 3, 0.5
    grid = torch.meshgrid([torch.arange(size, dtype=torch.float32)] * 2, indexing="ij")
    k = 1
    for g in grid:
        mean = (size - 1) / 2
        k = k * (1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((g - mean) / (2 * sigma)) ** 2)))
    return (k / k.sum()).view(1, 1, size, size).to(device)


@dataclass
class MapStore:
    """Caller-owned buffers the attention kernel writes head-averaged cross-attention maps into.

    layers: indices of the aggregated layers; buffer: [L, R, Nq, Nk] float32, allocated once
    per edit (``buffer[l]`` is layer l's ``plan.store`` entry, rewritten every step);
    weights: [L] each layer's share of the head average (its head count / all heads), so the
    layer-weighted mean of per-layer head means equals diffusers' mean over every (layer, head)
    map; res: (h/4, w/4), the maps' spatial size.
    """

    layers: list[int]
    buffer: Tensor
    weights: Tensor
    res: tuple[int, int]

    @property
    def store(self) -> dict[int, Tensor]:
        return {idx: self.buffer[l] for l, idx in enumerate(self.layers)}


def mask_layers(unet) -> list[tuple[int, int]]:
    """(layer index, heads) of the cross-attention layers diffusers aggregates for M¹: those
    of the down and up blocks (not the mid block) at 1/4 of the latent resolution."""
    out = []
    for mod in unet.modules():
        if isinstance(mod, Attention) and mod.layer is not None:
            ly = mod.layer
            if ly.cross and ly.place in ("down", "up") and ly.scale == 4:
                out.append((ly.index, mod.heads))
    return sorted(out)


def make_map_store(unet, rows: int, h: int, w: int, n_keys: int, device) -> MapStore:
    """Allocate the map buffers for an edit of ``rows`` UNet rows on an h x w latent."""
    if h % 4 or w % 4:
        raise ValueError(f"cross-attention masks need latent sides that are multiples of 4 (diffusers' "
                         f"1/4-resolution maps); the latent is {h}x{w}: pass height/width multiples of "
                         f"{4 * 8} for SD-family VAEs, or set use_cross_attn_mask=False, use_intersect_mask=False")
    chosen = mask_layers(unet)
    if not chosen:
        raise ValueError("cross-attention masks use the down/up cross-attention layers at 1/4 of the latent "
                         "resolution, and this UNet has none; set use_cross_attn_mask=False, use_intersect_mask=False")
    heads = torch.tensor([hd for _, hd in chosen], dtype=torch.float32, device=device)
    res = (h // 4, w // 4)
    buf = torch.zeros(len(chosen), rows, res[0] * res[1], n_keys, dtype=torch.float32, device=device)
    return MapStore([i for i, _ in chosen], buf, heads / heads.sum(), res)


def attention_mask(maps: MapStore, first_row: int, tokens: Tensor, threshold: Tensor, size: tuple[int, int],
                   kernel: Tensor) -> Tensor:
    """M¹ for every concept row: [nB, 1, h, w] in {0, 1}.

    tokens: [nB, Nk] 1.0 on each row's concept tokens; threshold: [nB] quantile levels.
    Rows ``first_row:`` of the buffers are the concept rows (the unconditional ones precede).
    """
    buf = maps.buffer[:, first_row:]  # [L, nB, Nq, Nk]
    # Mean over layers and heads, then the sum over the concept's tokens (diffusers' order of
    # reductions differs only in rounding).
    m = torch.einsum("l,lrqk,rk->rq", maps.weights, buf, tokens.to(buf.dtype))  # [nB, Nq]
    m = m.view(-1, 1, *maps.res)  # [nB, 1, h/4, w/4]
    m = F.conv2d(F.pad(m, (1, 1, 1, 1), mode="reflect"), kernel)  # [nB, 1, h/4, w/4]
    thr = row_quantile(m.flatten(1), threshold)  # [nB]
    mask = (m >= thr[:, None, None, None]).to(torch.float32)  # [nB, 1, h/4, w/4]
    return F.interpolate(mask, size)  # [nB, 1, h, w] nearest, as diffusers


# ----------------------------------------------------------------------------- the guidance term


def sega_guidance(uncond: Tensor, concepts: Tensor, signed_scale: Tensor, threshold: Tensor, active: Tensor,
                  mode: str, attn_mask: Tensor | None = None, user_mask: Tensor | None = None,
                  attn_only: Tensor | None = None) -> Tensor:
    """The summed, masked SEGA term of one step: [B, C, h, w].

    uncond [B, C, h, w], concepts [n, B, C, h, w] model outputs; signed_scale, threshold,
    active: [n]; attn_mask: [n, B, 1, h, w] (M¹) for modes "attn" and "intersect";
    user_mask broadcasts against [B, C, h, w]. mode: "noise" (M² only), "attn" (M¹ only) or
    "intersect" (M¹ ∧ M²). attn_only: a [] bool tensor; where true, "intersect" uses M¹ alone
    (diffusers' SD pipeline above t = 800), decided on the device: no host branch per step.
    """
    n = concepts.shape[0]
    g = (concepts - uncond) * signed_scale.to(concepts.dtype).view(n, 1, 1, 1, 1)  # [n, B, C, h, w]
    if user_mask is not None:
        g = g * user_mask.to(g.dtype)
    if mode == "attn":
        g = g * attn_mask.to(g.dtype)
    else:
        mag = g.abs().sum(dim=2, keepdim=True)  # [n, B, 1, h, w] channel-summed magnitude
        flat = mag.flatten(2).flatten(0, 1).float()  # [nB, h*w]; quantiles in float32 as diffusers
        thr = row_quantile(flat, threshold.repeat_interleave(mag.shape[1]))  # [nB]
        keep = mag >= thr.view(mag.shape[0], mag.shape[1], 1, 1, 1).to(mag.dtype)  # [n, B, 1, h, w] M²
        if mode == "intersect":
            if attn_only is not None:
                keep = keep | attn_only  # M² all ones: 1 · M¹ is M¹ exactly
            g = g * (keep.to(g.dtype) * attn_mask.to(g.dtype))
        elif mode == "noise":
            g = torch.where(keep, g, torch.zeros_like(g))
        else:
            raise ValueError(f"unknown mask mode {mode!r}")
    g = g * active.to(g.dtype).view(n, 1, 1, 1, 1)  # concepts outside their warm-up/cool-down window add 0
    return g.sum(dim=0)  # [B, C, h, w]
