"""The attention seam: every attention call of every executor goes through here.

Editing methods never patch modules. They describe what they want as data, an
:class:`AttentionPlan`, which the executor passes down with the inputs; each
attention layer asks the plan for its instructions (rows to read queries, keys
or values from, token re-weighting, a buffer to store head-averaged maps into,
IP-Adapter image tokens) and hands them to one fused kernel,
:func:`kernels.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import kernels


@dataclass(frozen=True)
class AttnLayer:
    """Identity of one attention layer, fixed when the model is built."""

    index: int  # position among all attention layers, in forward order
    name: str  # diffusers' module path, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    cross: bool  # cross-attention (keys from the text) or self-attention
    place: str  # "down", "mid" or "up"
    scale: int = 1  # spatial downsampling vs the latent: the layer sees (h/scale)*(w/scale) queries


@dataclass
class AttentionPlan:
    """Per-forward attention instructions, passed as data through the executor.

    ``self_inject`` / ``cross_inject``: kernel keyword arguments (``q_from``,
    ``k_from``, ``v_from``: int tensors [B]) applied to self- or cross-attention
    layers whose index is in ``layers`` (all layers when ``layers`` is None).
    ``token_weights`` [B, Nk] re-weights cross-attention probabilities.
    ``store`` maps a layer index to a caller-owned buffer [B, Nq, Nk] receiving
    head-averaged cross-attention probabilities. ``ip`` holds IP-Adapter image
    tokens per layer index: ``(k_img, v_img, scale)``.
    """

    self_inject: dict | None = None
    cross_inject: dict | None = None
    layers: frozenset[int] | None = None
    token_weights: torch.Tensor | None = None
    store: dict[int, torch.Tensor] = field(default_factory=dict)
    ip: dict[int, tuple] = field(default_factory=dict)

    def args(self, layer: AttnLayer) -> dict:
        out: dict = {}
        active = self.layers is None or layer.index in self.layers
        inject = self.cross_inject if layer.cross else self.self_inject
        if active and inject:
            out.update(inject)
        if layer.cross and active and self.token_weights is not None:
            out["token_weights"] = self.token_weights
        if layer.index in self.store:
            out["store"] = self.store[layer.index]
        if layer.index in self.ip:
            out["ip"] = self.ip[layer.index]
        return out


def attention(q, k, v, layer: AttnLayer | None = None, plan: AttentionPlan | None = None):
    """The seam. q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D]."""
    if plan is None or layer is None:
        return kernels.attention(q, k, v)
    return kernels.attention(q, k, v, **plan.args(layer))


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out.0)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.cross = context_dim is not None
        ctx = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.layer: AttnLayer | None = None  # assigned by the executor after construction

    def forward(self, x, context=None, plan: AttentionPlan | None = None):
        b, n, c = x.shape  # [B, N, C]
        ctx = context if self.cross else x
        h = self.heads
        # Views, not copies: the kernel takes strides.
        q = self.to_q(x).view(b, n, h, c // h).transpose(1, 2)  # [B, H, N, D]
        k = self.to_k(ctx).view(b, ctx.shape[1], h, c // h).transpose(1, 2)  # [B, H, Nk, D]
        v = self.to_v(ctx).view(b, ctx.shape[1], h, c // h).transpose(1, 2)  # [B, H, Nk, D]
        out = attention(q, k, v, self.layer, plan)  # [B, H, N, D]
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))  # [B, N, C]


def number_attention_layers(model: nn.Module, scale_of=lambda name: 1) -> list[AttnLayer]:
    """Give every Attention module of ``model`` its AttnLayer, in module order.

    ``scale_of(name)`` returns the layer's spatial downsampling factor."""
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            place = name.split(".")[0].split("_")[0]  # "down_blocks.0..." -> "down"
            mod.layer = AttnLayer(len(layers), name, mod.cross, place, scale_of(name))
            layers.append(mod.layer)
    return layers
