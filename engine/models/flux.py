"""Our FLUX.1 transformer (Black Forest Labs 2024): double-stream then single-stream blocks
over text and image tokens, with diffusers' ``FluxTransformer2DModel`` parameter names so its
``transformer/*.safetensors`` load with no renaming.

Every attention call goes through the seam (:func:`engine.models.attention.attention`) as
joint attention: the T5 tokens first, then the image tokens, rotary embeddings already
applied. A plan's instructions work here as in the UNet: **store** head-averaged image-query
x text-key maps, **inject** another row's image keys / values (the row keeps its own prompt).
Per-row vectors (timestep, guidance, pooled text, every modulation) run through
:func:`~engine.models.layers.rowwise`, so a row computes the same whatever shares its call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttnLayer, attention
from .flux_config import FluxConfig
from .layers import TimestepEmbedding, rowwise, timestep_embedding

__all__ = ["FluxConfig", "FluxTransformer2DModel", "pack", "unpack", "image_ids", "rope"]


# ----------------------------------------------------------------------------- latents and positions


def pack(z: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> tokens [B, (h/2)(w/2), 4C] (2 x 2 patches, row-major), as FluxPipeline."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens [B, (h/2)(w/2), 4C] -> latents [B, C, h, w] (the inverse of :func:`pack`)."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """RoPE positions of the packed tokens of an h x w latent: [(h/2)(w/2), 3] = (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def rope(ids: torch.Tensor, axes: tuple, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (Su et al. 2021) over position ids [S, n_axes]: (cos, sin), each [S, D], every
    axis its share of the head width; frequencies in float64 (float32 on MPS), as FLUX."""
    f64 = torch.float64 if ids.device.type != "mps" else torch.float32
    cos, sin = [], []
    for i, dim in enumerate(axes):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=f64, device=ids.device) / dim))  # [dim/2]
        ang = torch.outer(ids[:, i].float(), freqs)  # [S, dim/2]
        cos.append(ang.cos().repeat_interleave(2, dim=1).float())
        sin.append(ang.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, -1), torch.cat(sin, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated pairwise (d even, d+1) by the tables [S, D]."""
    re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, S, H, D/2]
    rotated = torch.stack([-im, re], dim=-1).flatten(3)  # [B, S, H, D]
    return (x.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)


# ----------------------------------------------------------------------------- modules


class TimeTextEmbed(nn.Module):
    """timestep (and guidance) sinusoids through MLPs, plus the projected pooled text: [B, dim]."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.guidance_embedder = TimestepEmbedding(256, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # the same MLP (linear, SiLU, linear) on pooled text

    def forward(self, t, guidance, pooled):
        emb = self.timestep_embedder(timestep_embedding(t, 256).to(pooled.dtype))  # [B, dim]
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance, 256).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class Modulation(nn.Module):
    """adaLN-Zero (Peebles & Xie 2023): LayerNorm without affine, then per-row shift / scale (and
    gates) from the conditioning; ``chunks`` = 6 (double block), 3 (single), 2 (output)."""

    def __init__(self, dim: int, chunks: int, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.chunks = chunks

    def forward(self, x, emb):
        parts = rowwise(self.linear, F.silu(emb)).chunk(self.chunks, dim=1)  # each [B, dim]
        shift, scale = (parts[1], parts[0]) if self.chunks == 2 else parts[:2]  # the output norm: (scale, shift)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], parts[2:]


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """diffusers' FeedForward with "gelu-approximate": ``net.0.proj``, (dropout), ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class JointAttention(nn.Module):
    """FLUX attention: q/k/v with per-head RMSNorm, the text stream's own projections
    (``add_*``, double blocks), RoPE, then one call of the seam over [text; image] tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, context: bool, out: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)]) if out else None  # index 1 is dropout in diffusers
        if context:
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.to_add_out = nn.Linear(inner, dim)
        self.context = context
        self.layer: AttnLayer | None = None  # assigned by the executor

    def _heads(self, x):
        return x.unflatten(-1, (self.heads, self.head_dim))  # [B, S, H, D]

    def forward(self, x, context, rotary, text: int, plan=None):
        """x [B, S, dim] (with ``context``: image tokens, context [B, L, dim] the text's; without:
        the joint sequence whose first ``text`` tokens are the text's) -> [B, S(+L), H*D]."""
        q, k, v = self.norm_q(self._heads(self.to_q(x))), self.norm_k(self._heads(self.to_k(x))), self._heads(self.to_v(x))
        if self.context:
            cq = self.norm_added_q(self._heads(self.add_q_proj(context)))  # [B, L, H, D]
            ck = self.norm_added_k(self._heads(self.add_k_proj(context)))
            cv = self._heads(self.add_v_proj(context))
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)  # [B, L+N, H, D]
        q, k = apply_rope(q, *rotary), apply_rope(k, *rotary)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.layer, plan, text=text)  # [B, H, S, D]
        return out.transpose(1, 2).flatten(2).to(q.dtype)  # [B, S, H*D]


class DoubleBlock(nn.Module):
    """MM-DiT block (Esser et al. 2024): text and image streams with their own weights, one joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm1_context = Modulation(dim, 6), Modulation(dim, 6)
        self.attn = JointAttention(dim, heads, head_dim, context=True, out=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim)

    def forward(self, x, c, temb, rotary, plan=None):
        nx, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb)  # [B, N, dim]
        nc, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(c, temb)  # [B, L, dim]
        text = c.shape[1]
        out = self.attn(nx, nc, rotary, text, plan)  # [B, L+N, dim]
        c_attn, x_attn = out[:, :text], out[:, text:]
        x = x + gate[:, None] * self.attn.to_out[0](x_attn.contiguous())
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * self.ff(h)
        c = c + c_gate[:, None] * self.attn.to_add_out(c_attn.contiguous())
        h = self.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        c = c + c_gate_mlp[:, None] * self.ff_context(h)
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        return x, c


class SingleBlock(nn.Module):
    """Parallel attention + MLP block over the joint sequence (Dehghani et al. 2023)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = Modulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, hidden)
        self.proj_out = nn.Linear(dim + hidden, dim)
        self.attn = JointAttention(dim, heads, head_dim, context=False, out=False)

    def forward(self, h, temb, rotary, text: int, plan=None):
        """h [B, L+N, dim] (text first) -> the same."""
        nh, (gate,) = self.norm(h, temb)
        mlp = F.gelu(self.proj_mlp(nh), approximate="tanh")  # [B, S, hidden]
        out = self.attn(nh, None, rotary, text, plan)  # [B, S, dim]
        h = h + gate[:, None] * self.proj_out(torch.cat([out, mlp], dim=2))
        if h.dtype == torch.float16:
            h = h.clip(-65504, 65504)
        return h


class FluxTransformer2DModel(nn.Module):
    """FLUX.1-dev / -schnell transformer. ``forward`` takes what diffusers' does (timesteps and
    guidance as fractions: they are multiplied by 1000 inside) plus an attention plan."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        c = config
        self.config = c
        dim = c.num_attention_heads * c.attention_head_dim
        self.time_text_embed = TimeTextEmbed(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(c.in_channels, dim)
        heads, hd = c.num_attention_heads, c.attention_head_dim
        self.transformer_blocks = nn.ModuleList([DoubleBlock(dim, heads, hd) for _ in range(c.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleBlock(dim, heads, hd) for _ in range(c.num_single_layers)])
        self.norm_out = Modulation(dim, 2)
        self.proj_out = nn.Linear(dim, c.out_channels or c.in_channels)
        self.attn_layers = number_joint_layers(self)

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None, plan=None):
        """hidden_states [B, N, C_in] packed latents, encoder_hidden_states [B, L, D_t5], pooled
        [B, P], timestep [B] in [0, 1], ids [N, 3] / [L, 3], guidance [B] (dev) -> [B, N, C_out]."""
        x = self.x_embedder(hidden_states.to(self.dtype))  # [B, N, dim]
        t = timestep.to(x.dtype) * 1000
        g = guidance.to(x.dtype) * 1000 if guidance is not None else None
        if (g is None) == self.config.guidance_embeds:
            raise ValueError("this FLUX model " + ("takes a guidance value (FLUX.1-dev): pass guidance"
                                                  if self.config.guidance_embeds else "has no guidance embedding"))
        temb = self.time_text_embed(t, g, pooled_projections.to(x.dtype))  # [B, dim]
        c = self.context_embedder(encoder_hidden_states.to(x.dtype))  # [B, L, dim]
        rotary = rope(torch.cat([txt_ids, img_ids]), self.config.axes_dims_rope)  # ([L+N, D], [L+N, D])
        residual = getattr(plan, "block_residual", None)  # e.g. PuLID's id cross-attention, as plan data
        for i, block in enumerate(self.transformer_blocks):
            x, c = block(x, c, temb, rotary, plan)
            if residual is not None:
                x = residual("double", i, x)
        text = c.shape[1]
        h = torch.cat([c, x], dim=1)  # [B, L+N, dim]
        for i, block in enumerate(self.single_transformer_blocks):
            h = block(h, temb, rotary, text, plan)
            if residual is not None:
                img = h[:, text:]  # the image tokens of the joint sequence
                new = residual("single", i, img)  # ``img`` itself where the plan adds nothing
                if new is not img:
                    h = torch.cat([h[:, :text], new], dim=1)
        x, _ = self.norm_out(h[:, text:], temb)
        return self.proj_out(x)  # [B, N, C_out]


def number_joint_layers(model: nn.Module) -> list[AttnLayer]:
    """Give every JointAttention of ``model`` its AttnLayer (place "double" or "single"), in order."""
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, JointAttention):
            place = "double" if name.startswith("transformer_blocks") else "single"
            mod.layer = AttnLayer(len(layers), name, False, place)
            layers.append(mod.layer)
    return layers
