"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models"): image prompts as extra keys and values of every cross-attention layer.

An image encoder's output becomes a few *image tokens* [B, T, Dctx] (:class:`ImageProjection`,
the plain adapter's linear map of the pooled image embedding; :class:`Resampler`, "plus", a
perceiver over the encoder's penultimate hidden states). Each cross-attention layer projects
the tokens with its own ``to_k_ip`` / ``to_v_ip`` and adds ``scale · softmax(q k_ipᵀ) v_ip`` to
the text attention ("decoupled cross-attention", Sec. 3.2). The weights live in this module,
beside the UNet, never inside it: the adapter turns tokens into attention instructions (an
:class:`ImagePlan`, the plan's ``ip`` per layer) that the seam hands to the kernel's ``ip=``
path, so the image read happens in the same pass as the text read.

Parameter names are those of the published files (``ip-adapter_sd15.safetensors``,
``ip-adapter-plus_sdxl_vit-h.safetensors``: ``image_proj.*`` and ``ip_adapter.{i}.to_k_ip``
with ``i`` the attention processor's position in diffusers' order); :func:`from_state_dict`
builds the adapter they describe for a given UNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import PlanOverlay

RESAMPLER_HEAD_DIM = 64  # the published Resampler's head width (heads = inner width / 64)


class ImageProjection(nn.Module):
    """The plain adapter: pooled image embedding [B, E] -> ``tokens`` image tokens [B, T, Dctx]."""

    def __init__(self, embed_dim: int, cross_dim: int, tokens: int = 4):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        x = self.proj(embeds.to(self.proj.weight.dtype))  # [B, T*Dctx]
        return self.norm(x.reshape(embeds.shape[0], self.tokens, -1))  # [B, T, Dctx]


class PerceiverAttention(nn.Module):
    """Latent queries attend to [features; latents] (Jaegle et al. 2021), pre-normed."""

    def __init__(self, dim: int, heads: int, head_dim: int = RESAMPLER_HEAD_DIM):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)  # [B, N, C], [B, T, C]
        b, t, _ = latents.shape
        h = self.heads
        q = self.to_q(latents).view(b, t, h, -1).transpose(1, 2)  # [B, H, T, D]
        kv = torch.cat([x, latents], dim=1)  # [B, N+T, C]
        k, v = self.to_kv(kv).view(b, kv.shape[1], 2, h, -1).permute(2, 0, 3, 1, 4)  # [B, H, N+T, D] each
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, D]
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))  # [B, T, C]


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    # Indices as the published files: 0 LayerNorm, 1 Linear, 2 GELU, 3 Linear (no biases).
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter "plus": ``tokens`` learned queries read the image encoder's hidden states
    [B, N, E] through ``depth`` perceiver blocks -> image tokens [B, T, Dctx]."""

    def __init__(self, embed_dim: int, hidden: int, cross_dim: int, tokens: int, depth: int, heads: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, tokens, hidden) / hidden**0.5)
        self.proj_in = nn.Linear(embed_dim, hidden)
        self.proj_out = nn.Linear(hidden, cross_dim)
        self.norm_out = nn.LayerNorm(cross_dim)
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(hidden, heads), _feed_forward(hidden)])
                                     for _ in range(depth)])

    def forward(self, states: Tensor) -> Tensor:
        x = self.proj_in(states.to(self.proj_in.weight.dtype))  # [B, N, hidden]
        latents = self.latents.expand(x.shape[0], -1, -1)  # [B, T, hidden]
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # [B, T, Dctx]


@dataclass
class ImagePlan(PlanOverlay):
    """A plan plus IP-Adapter image keys / values per cross-attention layer (the kernel's ``ip``)."""

    ip: dict = None  # layer index -> (k_img [R, H, T, D], v_img [R, H, T, D], scale [R] float32)

    def args(self, layer) -> dict:
        out = super().args(layer)
        return {**out, "ip": self.ip[layer.index]} if layer.index in self.ip else out


def processor_order(layers) -> list:
    """The attention layers in diffusers' ``attn_processors`` order: its UNet registers
    ``down_blocks``, ``up_blocks``, then ``mid_block``; ours runs them in forward order."""
    rank = {"down": 0, "up": 1, "mid": 2}
    return sorted(layers, key=lambda l: (rank.get(l.place, 3), l.index))


class IPAdapter(nn.Module):
    """An image-prompt adapter for one UNet: the image projection and, per cross-attention layer,
    ``to_k_ip`` / ``to_v_ip``. ``kind``: "plain" (pooled image embedding in) or "plus" (the image
    encoder's penultimate hidden states in)."""

    def __init__(self, image_proj: nn.Module, cross: list, cross_dim: int, kind: str):
        super().__init__()
        self.image_proj, self.kind = image_proj, kind
        self.layers = [l.index for l, _, _ in cross]  # the UNet's cross-attention layers, forward order
        self.heads = [h for _, h, _ in cross]
        self.to_k_ip = nn.ModuleList([nn.Linear(cross_dim, dim, bias=False) for _, _, dim in cross])
        self.to_v_ip = nn.ModuleList([nn.Linear(cross_dim, dim, bias=False) for _, _, dim in cross])
        self.names = [l.name for l, _, _ in cross]
        self.scales = [1.0] * len(cross)

    @property
    def tokens(self) -> int:
        p = self.image_proj
        return p.tokens if isinstance(p, ImageProjection) else p.latents.shape[1]

    @property
    def token_dim(self) -> int:
        return self.to_k_ip[0].in_features

    def project(self, embeds: Tensor) -> Tensor:
        """Image encoder output (pooled [B, E] for "plain", hidden states [B, N, E] for "plus")
        -> image tokens [B, T, Dctx]."""
        return self.image_proj(embeds)

    def set_scale(self, scale) -> None:
        """Per-layer scales: a float for every layer, or {name prefix: scale} (layers matching no
        prefix get 0: InstantStyle's "only these blocks", Wang et al. 2024), or diffusers'
        ``set_ip_adapter_scale`` dict ({"down": {"block_2": [0.0, 1.0]}, "up": {...}, "mid": s})."""
        if isinstance(scale, (int, float)):
            self.scales = [float(scale)] * len(self.layers)
            return
        if not isinstance(scale, dict):
            raise TypeError(f"IP-Adapter scale must be a number or a dict, got {type(scale).__name__}")
        prefixes = _diffusers_scales(scale) if set(scale) & {"down", "mid", "up"} else dict(scale)
        matched = set()
        new = []
        for name in self.names:
            hits = [p for p in prefixes if name == p or name.startswith(p + ".")]
            best = max(hits, key=len) if hits else None
            matched.update(hits)
            new.append(float(prefixes[best]) if best is not None else 0.0)
        if unknown := set(prefixes) - matched:
            raise ValueError(f"IP-Adapter scale names no cross-attention layer: {sorted(unknown)}; "
                             f"layers are named like {self.names[0]!r}")
        self.scales = new

    def plan(self, tokens: Tensor, scale: Tensor, base=None) -> ImagePlan:
        """Attention instructions for rows whose image tokens are ``tokens`` [R, T, Dctx] at per-row
        ``scale`` [R] (0: the row reads no image; its output is exactly the text attention's)."""
        r, t, _ = tokens.shape
        ip = {}
        scale = scale.to(torch.float32)
        for j, idx in enumerate(self.layers):
            if self.scales[j] == 0.0:
                continue  # as diffusers: a layer at scale 0 skips the image read
            h = self.heads[j]
            k = self.to_k_ip[j](tokens).view(r, t, h, -1).transpose(1, 2)  # [R, H, T, D]
            v = self.to_v_ip[j](tokens).view(r, t, h, -1).transpose(1, 2)  # [R, H, T, D]
            ip[idx] = (k, v, scale * self.scales[j])
        return ImagePlan(base, ip)


def _diffusers_scales(spec: dict) -> dict:
    """diffusers' nested scale dict -> {name prefix: scale}: "down"/"up" map "block_i" to a float
    or a list over the block's transformers; "mid" takes a float."""
    out = {}
    for part, blocks in spec.items():
        if part == "mid":
            out["mid_block.attentions.0"] = float(blocks if not isinstance(blocks, (list, tuple)) else blocks[0])
            continue
        if part not in ("down", "up"):
            raise ValueError(f"IP-Adapter scale keys are 'down', 'mid' and 'up' (or layer names), got {part!r}")
        for block, value in blocks.items():
            i = int(block.removeprefix("block_"))
            values = value if isinstance(value, (list, tuple)) else None
            if values is None:
                out[f"{part}_blocks.{i}"] = float(value)
            else:
                out.update({f"{part}_blocks.{i}.attentions.{j}": float(s) for j, s in enumerate(values)})
    return out


def context_dim(unet) -> int:
    """The width of the UNet's text context (what image tokens must match)."""
    dim = unet.config.cross_attention_dim
    return dim[0] if isinstance(dim, (list, tuple)) else dim


def cross_layers(unet) -> list:
    """(AttnLayer, heads, width) of every cross-attention layer of ``unet``, forward order."""
    out = []
    for _, mod in unet.named_modules():
        layer = getattr(mod, "layer", None)
        if layer is not None and layer.cross and hasattr(mod, "heads"):
            out.append((layer, mod.heads, mod.to_q.out_features))
    return sorted(out, key=lambda c: c[0].index)


def from_state_dict(unet, state: dict[str, Tensor]) -> IPAdapter:
    """Build the adapter a published file describes for ``unet`` and load its tensors.

    ``state``: the file's tensors (``image_proj.*``, ``ip_adapter.*``). Raises ValueError with
    what does not fit (another model family's adapter, an unsupported variant)."""
    proj = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
    attn = {k.removeprefix("ip_adapter."): v for k, v in state.items() if k.startswith("ip_adapter.")}
    if not proj or not attn:
        raise ValueError("not an IP-Adapter file: it needs image_proj.* and ip_adapter.* tensors")
    cross_dim = context_dim(unet)
    if "proj.weight" in proj and "latents" not in proj:
        out_dim, embed_dim = proj["proj.weight"].shape
        tokens = out_dim // proj["norm.weight"].shape[0]
        image_proj, kind = ImageProjection(embed_dim, proj["norm.weight"].shape[0], tokens), "plain"
    elif "latents" in proj:
        depth = 1 + max(int(k.split(".")[1]) for k in proj if k.startswith("layers."))
        _, tokens, hidden = proj["latents"].shape
        heads = proj["layers.0.0.to_q.weight"].shape[0] // RESAMPLER_HEAD_DIM
        image_proj = Resampler(proj["proj_in.weight"].shape[1], hidden, proj["proj_out.weight"].shape[0], tokens,
                               depth, heads)
        kind = "plus"
    else:
        raise ValueError("unsupported IP-Adapter variant (only the plain and the plus adapters are): its image_proj "
                         f"has {sorted(proj)[:4]}")
    made = _image_dim(image_proj)
    if made != cross_dim:
        raise ValueError(f"this IP-Adapter makes {made}-wide image tokens but the UNet's cross-attention takes "
                         f"{cross_dim}: it was trained for another model family")
    cross = cross_layers(unet)
    adapter = IPAdapter(image_proj, cross, cross_dim, kind)
    ordered = processor_order([l for l in unet.attn_layers])
    key_of = {l.index: i for i, l in enumerate(ordered)}
    sd = {f"image_proj.{k}": v for k, v in proj.items()}
    for j, (layer, _, _) in enumerate(cross):
        for name in ("to_k_ip", "to_v_ip"):
            key = f"{key_of[layer.index]}.{name}.weight"
            if key not in attn:
                raise ValueError(f"the IP-Adapter has no {key} for {layer.name}: it was made for another UNet")
            sd[f"{name}.{j}.weight"] = attn.pop(key)
    if attn:
        raise ValueError(f"the IP-Adapter has weights for attention layers this UNet lacks, e.g. {sorted(attn)[:3]}: "
                         f"it was made for another UNet")
    try:
        adapter.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the IP-Adapter's weights do not fit this UNet: {e}") from None
    return adapter.to(unet.device, unet.dtype).eval().requires_grad_(False)


def _image_dim(proj: nn.Module) -> int:
    return proj.norm.normalized_shape[0] if isinstance(proj, ImageProjection) else proj.norm_out.normalized_shape[0]


def to_state_dict(adapter: IPAdapter, unet) -> dict[str, Tensor]:
    """The adapter's tensors in the published layout (what :func:`from_state_dict` reads)."""
    ordered = processor_order(list(unet.attn_layers))
    key_of = {l.index: i for i, l in enumerate(ordered)}
    out = {f"image_proj.{k}": v for k, v in adapter.image_proj.state_dict().items()}
    for j, idx in enumerate(adapter.layers):
        out[f"ip_adapter.{key_of[idx]}.to_k_ip.weight"] = adapter.to_k_ip[j].weight
        out[f"ip_adapter.{key_of[idx]}.to_v_ip.weight"] = adapter.to_v_ip[j].weight
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}
