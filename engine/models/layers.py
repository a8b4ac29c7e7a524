"""UNet building blocks as plain modules with diffusers' parameter names.

Names matter more than structure here: a diffusers checkpoint must load into
these modules with no key renaming, so every submodule keeps the attribute name
diffusers gives it (``norm1``, ``time_emb_proj``, ``transformer_blocks``, ...).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, AttentionPlan
from .features import inject_features


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0):
    """Sinusoidal embedding of timesteps t [B] -> [B, dim] (float32), as in DDPM (Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


ROW_BLOCK = 16  # rows per GEMM for per-row vectors in "blocks" mode
_SEGMENTS: contextvars.ContextVar = contextvars.ContextVar("row_segments", default=None)  # per thread / task


@contextlib.contextmanager
def row_segments(spec):
    """How per-row vectors (timestep and added embeddings) meet their GEMMs within the block:
    None, one GEMM over the batch (as diffusers); a tuple of row counts, one GEMM per segment
    (each request's rows as if run alone); "blocks", fixed blocks of ROW_BLOCK rows (every
    call the same whatever shares it)."""
    token = _SEGMENTS.set(spec)
    try:
        yield
    finally:
        _SEGMENTS.reset(token)


def checkpointed(fn, *args):
    """``fn(*args)`` with activation checkpointing (Chen et al. 2016): its activations are not
    kept for backward but recomputed then, under the same :func:`row_segments` as the forward
    (so the recomputation matches it bit for bit). Only when autograd records the call."""
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return fn(*args)
    spec = _SEGMENTS.get()
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), row_segments(spec)))


def rowwise(linear: nn.Linear, x):
    """``linear(x)`` for per-row vectors x [B, D], split as :func:`row_segments` says.

    A GEMM's kernel (and so its summation order) depends on M, and tiny M (one or two rows
    per sample) takes other paths than larger ones: the same row then embeds differently
    in a batch of 2 rows and in one of 17 (~1e-7), and the difference grows through the
    steps. Splitting keeps a row's embedding independent of what else shares its batch,
    at no cost next to the UNet's convolutions."""
    spec = _SEGMENTS.get()
    if spec is None:
        return linear(x)
    b = x.shape[0]
    if spec == "blocks":
        pad = (-b) % ROW_BLOCK
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])  # [B', D]
        return torch.cat([linear(c) for c in x.split(ROW_BLOCK)])[:b]
    if sum(spec) != b:
        raise ValueError(f"row segments {spec} do not add up to the batch of {b} rows")
    return torch.cat([linear(c.clone()) for c in x.split(list(spec))])  # own allocation: same alignment as alone


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return rowwise(self.linear_2, F.silu(rowwise(self.linear_1, x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.site = None  # its FeatureSite, assigned by the executor after construction

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))  # [B, Cout, H, W]
        h = h + rowwise(self.time_emb_proj, F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # An explicit size keeps odd latent sizes aligned with their skip connections.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020), as the SD feed-forward uses."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 is dropout in diffusers; an Identity keeps the checkpoint's ``net.2`` key.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward; pre-LayerNorm with residuals."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.site = None  # its FeatureSite (the block's input), assigned by the executor

    def forward(self, x, context, plan: AttentionPlan | None = None):
        x = inject_features(x, self.site, plan)  # [B, N, C]
        x = self.attn1(self.norm1(x), plan=plan) + x  # [B, N, C]
        x = self.attn2(self.norm2(x), context, plan=plan) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project to tokens, transformer blocks, project back."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        )

    def forward(self, x, context, plan: AttentionPlan | None = None):
        b, c, h, w = x.shape  # [B, C, H, W]
        hid = self.norm(x)
        if self.linear:
            hid = self.proj_in(hid.permute(0, 2, 3, 1).reshape(b, h * w, c))  # [B, HW, C]
        else:
            hid = self.proj_in(hid).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, HW, C]
        for block in self.transformer_blocks:
            hid = block(hid, context, plan)
        if self.linear:
            # contiguous: a channels-last-strided result would send the next GroupNorm down
            # another kernel (different reduction order) than diffusers'.
            hid = self.proj_out(hid).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]
        else:
            hid = self.proj_out(hid.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous())
        return hid + x
