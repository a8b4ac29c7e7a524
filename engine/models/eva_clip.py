"""EVA02-CLIP's vision tower (Sun et al. 2023, "EVA-CLIP: Improved Training Techniques for CLIP at
Scale", arXiv:2303.15389), as PuLID reads faces with it: EVA02-CLIP-L-14-336.

A pre-norm ViT whose attention adds 2D rotary position embeddings to the patch tokens' queries
and keys (the class token is not rotated), a LayerNorm inside the attention before its output
projection and one inside the SwiGLU MLP ("subln"), biases on q and v only. ``forward`` returns
the class token's projection (the CLIP image embedding) and, for PuLID, the residual stream
entering blocks 4, 8, 12, 16 and 20. Parameter names are the published checkpoint's under
``visual.`` (``blocks.{i}.attn.q_proj.weight``, ``attn.q_bias``, ``mlp.w1`` ...); the rotary
tables are recomputed, never loaded. Attention runs through ``kernels.attention``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels


@dataclass(frozen=True)
class EvaVisionConfig:
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 2.6667
    embed_dim: int = 768
    eps: float = 1e-6
    rope_pt_seq_len: int = 16  # the grid the rotary frequencies were trained at (224 / 14)
    hidden_layers: tuple = (4, 8, 12, 16, 20)  # blocks whose input PuLID reads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "visual.", **over) -> "EvaVisionConfig":
        """Infer the sizes from a checkpoint's tensors (heads are not in the weights: 64-wide heads)."""
        try:
            width = sd[f"{prefix}cls_token"].shape[-1]
            patch = sd[f"{prefix}patch_embed.proj.weight"].shape[-1]
            tokens = sd[f"{prefix}pos_embed"].shape[1]
            layers = 1 + max(int(k[len(prefix) + 7:].split(".")[0]) for k in sd if k.startswith(f"{prefix}blocks."))
            hidden = sd[f"{prefix}blocks.0.mlp.w1.weight"].shape[0]
            embed = sd[f"{prefix}head.weight"].shape[0]
        except KeyError as e:
            raise ValueError(f"not an EVA-CLIP vision tower: missing {e.args[0]!r} (expected the published layout, "
                             f"e.g. '{prefix}blocks.0.attn.q_proj.weight')") from None
        grid = math.isqrt(tokens - 1)
        kw = dict(image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=max(1, width // 64),
                  mlp_ratio=hidden / width, embed_dim=embed)
        kw.update(over)
        cfg = cls(**kw)
        if cfg.mlp_hidden != hidden:  # int(width * ratio) must give the checkpoint's width back
            cfg = cls(**{**kw, "mlp_ratio": (hidden + 0.5) / width})
        return cfg


def rotary_tables(cfg: EvaVisionConfig, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin [grid², head_dim]: half the head dim rotates with the patch's row, half with its column."""
    dim = cfg.width // cfg.heads // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))  # [dim/2]
    t = torch.arange(cfg.grid, dtype=torch.float32, device=device) / cfg.grid * cfg.rope_pt_seq_len
    f = torch.repeat_interleave(torch.outer(t, freqs), 2, dim=-1)  # [grid, dim]: pairs share a frequency
    g = cfg.grid
    both = torch.cat([f[:, None, :].expand(g, g, dim), f[None, :, :].expand(g, g, dim)], dim=-1)  # [g, g, 2 dim]
    both = both.reshape(g * g, 2 * dim)
    return both.cos(), both.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x·cos + rotate_half(x)·sin, rotate_half taking adjacent pairs (x0, x1) to (-x1, x0)."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., D/2, 2]
    half = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + half * sin


class EvaAttention(nn.Module):
    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(w, w, bias=False) for _ in range(3))
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(w)), nn.Parameter(torch.zeros(w))
        self.inner_attn_ln = nn.LayerNorm(w, eps=cfg.eps)
        self.proj = nn.Linear(w, w)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, n, c = x.shape
        split = lambda t: t.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731  [B, H, N, D]
        q = split(F.linear(x, self.q_proj.weight, self.q_bias))
        k = split(self.k_proj(x))
        v = split(F.linear(x, self.v_proj.weight, self.v_bias))
        # the class token (first) keeps its position-free query and key
        q = torch.cat([q[:, :, :1], rotate(q[:, :, 1:], cos, sin).type_as(q)], dim=2)
        k = torch.cat([k[:, :, :1], rotate(k[:, :, 1:], cos, sin).type_as(k)], dim=2)
        out = kernels.attention(q, k, v)  # [B, H, N, D]
        return self.proj(self.inner_attn_ln(out.transpose(1, 2).reshape(b, n, c)))


class SwiGLU(nn.Module):
    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        h = cfg.mlp_hidden
        self.w1, self.w2 = nn.Linear(cfg.width, h), nn.Linear(cfg.width, h)
        self.ffn_ln = nn.LayerNorm(h, eps=cfg.eps)
        self.w3 = nn.Linear(h, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps), nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn, self.mlp = EvaAttention(cfg), SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, grid², width], row-major patches


class EvaVisionTower(nn.Module):
    """images [B, 3, S, S] (normalised with OpenAI CLIP's mean / std) -> (embedding [B, embed_dim],
    [the residual stream entering each of ``cfg.hidden_layers``: B, 1 + grid², width])."""

    def __init__(self, cfg: EvaVisionConfig):
        super().__init__()
        self.config = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2 + 1, cfg.width))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(EvaBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.head = nn.Linear(cfg.width, cfg.embed_dim)

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        cfg = self.config
        if images.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"the EVA-CLIP tower takes {cfg.image_size}x{cfg.image_size} images, got "
                             f"{tuple(images.shape[-2:])}")
        x = self.patch_embed(images.to(self.pos_embed.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # [B, N, W]
        cos, sin = rotary_tables(cfg, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        hidden = []
        for i, block in enumerate(self.blocks):
            if i in cfg.hidden_layers:
                hidden.append(x)
            x = block(x, cos, sin)
        return self.head(self.norm(x)[:, 0]), hidden

    # ---- weights ----------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "visual.", **config) -> "EvaVisionTower":
        """From a checkpoint in the published layout (``visual.*``; the text tower's keys and the
        rotary buffers are ignored)."""
        cfg = EvaVisionConfig.from_state_dict(sd, prefix, **config)
        model = cls(cfg)
        own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and "rope." not in k}
        missing, unexpected = model.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(f"EVA-CLIP vision weights do not match the published layout: missing "
                             f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
        return model.eval()

    @classmethod
    def from_file(cls, path, **config) -> "EvaVisionTower":
        """A safetensors checkpoint (the whole CLIP, or its ``visual.*`` part)."""
        from pathlib import Path

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"EVA-CLIP checkpoint {str(path)!r} does not exist; give the path of its .safetensors file")
        if path.suffix != ".safetensors":
            raise ValueError(f"{path.name}: only .safetensors checkpoints load here (pickles can run code); convert "
                             f"once with safetensors.torch.save_file(torch.load(f, weights_only=True), "
                             f"'{path.stem}.safetensors')")
        from safetensors.torch import load_file

        sd = load_file(str(path))
        prefix = "visual." if any(k.startswith("visual.") for k in sd) else ""
        return cls.from_state_dict(sd, prefix, **config)

    def to_state_dict(self, prefix: str = "visual.") -> dict:
        return {f"{prefix}{k}": v for k, v in self.state_dict().items()}

