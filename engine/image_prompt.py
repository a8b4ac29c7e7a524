"""Image prompts: an image encoder's view of a picture as IP-Adapter tokens.

:class:`ImageEncoder` wraps a ``CLIPVisionModelWithProjection`` with CLIP's preprocessing
(shortest side resized, centre crop, normalisation; settings from the encoder folder's
``preprocessor_config.json``); :class:`ImagePrompt` is what conditions rows: the image's
tokens, the null image's tokens (for the unconditional rows of classifier-free guidance,
as diffusers' IP-Adapter pipelines: a zero embedding for the plain adapter, the encoding
of an all-zero input for "plus") and a scale. Tight Inversion (arXiv 2502.20376) conditions
an inversion and its edits on the image itself this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImagePrompt:
    """Image tokens of B images and of the null image, and the scale they are read at."""

    cond: Tensor  # [B, T, Dctx]
    uncond: Tensor  # [B, T, Dctx]
    scale: float = 1.0

    def __post_init__(self):
        try:
            s = float(self.scale)
        except (TypeError, ValueError):
            s = math.nan
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"an image prompt's scale (image_scale, ip_adapter_scale, id_weight) must be a finite "
                             f"number 0 or more, got {self.scale!r}")
        self.scale = s

    def __len__(self) -> int:
        return self.cond.shape[0]

    def repeat(self, n: int) -> "ImagePrompt":
        """Each image n times in a row (n outputs per image prompt)."""
        return ImagePrompt(self.cond.repeat_interleave(n, 0), self.uncond.repeat_interleave(n, 0), self.scale)

    def tight(self) -> "ImagePrompt":
        """Unconditional rows read the image too: the model itself is conditioned on the image
        (Tight Inversion), and classifier-free guidance acts on the text alone."""
        return ImagePrompt(self.cond, self.cond, self.scale)


def _side(spec, default: int) -> tuple[int, int] | int:
    """transformers' size / crop_size entries -> an int (shortest edge) or (height, width)."""
    if spec is None:
        return default
    if isinstance(spec, int):
        return spec
    if "shortest_edge" in spec:
        return int(spec["shortest_edge"])
    return int(spec["height"]), int(spec["width"])


class ImageEncoder:
    """A CLIP vision tower and its preprocessing: images -> pooled embeddings or hidden states."""

    def __init__(self, model, preprocess: dict | None = None):
        self.model = model
        pre = preprocess or {}
        n = model.config.image_size
        self.resize = _side(pre.get("size"), n) if pre.get("do_resize", True) else None
        crop = _side(pre.get("crop_size"), n) if pre.get("do_center_crop", True) else None
        self.crop = (crop, crop) if isinstance(crop, int) else crop
        self.mean = tuple(pre.get("image_mean", CLIP_MEAN))
        self.std = tuple(pre.get("image_std", CLIP_STD))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> the encoder's normalised input [B, 3, h, w] (float32)."""
        x = images.float()
        if self.resize is not None:
            h, w = x.shape[-2:]
            if isinstance(self.resize, int):  # the shortest side to ``resize``, aspect kept
                s = self.resize / min(h, w)
                size = (max(1, round(h * s)), max(1, round(w * s)))
            else:
                size = self.resize
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            top, left = max(0, (h - ch) // 2), max(0, (w - cw) // 2)
            x = x[..., top:top + ch, left:left + cw]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, images: Tensor, hidden: bool) -> tuple[Tensor, Tensor]:
        """(embedding of the images, embedding of the null image): pooled and projected [B, E]
        (``hidden`` False; the null one is zeros) or the penultimate hidden states [B, N, E']
        (``hidden`` True; the null one encodes an all-zero input)."""
        x = self.preprocess(images).to(self.device, self.dtype)
        if not hidden:
            emb = self.model(pixel_values=x).image_embeds  # [B, E]
            return emb, torch.zeros_like(emb)
        run = lambda inp: self.model(pixel_values=inp, output_hidden_states=True).hidden_states[-2]  # noqa: E731
        return run(x), run(torch.zeros_like(x))  # [B, N, E'] each


@torch.no_grad()
def image_prompt(adapter, encoder: ImageEncoder, images: Tensor, scale: float = 1.0) -> ImagePrompt:
    """Images [B, 3, H, W] in [0, 1] -> their :class:`ImagePrompt` through ``adapter``'s projection."""
    emb, null = encoder.encode(images, hidden=adapter.kind == "plus")
    return ImagePrompt(adapter.project(emb), adapter.project(null), scale)
