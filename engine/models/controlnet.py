"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models") for the SD1.x/2.x and SDXL families: a trainable copy of the UNet's encoder that
reads a conditioning image and returns residuals for the UNet's skip connections and mid
block, each through a zero-initialised 1×1 convolution.

Same parameter names as diffusers' ``ControlNetModel`` (``controlnet_cond_embedding.*``,
``controlnet_down_blocks.*``, ``controlnet_mid_block``, and the encoder's own), so its
safetensors load as they are; the encoder blocks are the UNet's own modules
(:mod:`engine.models.unet`) and its attention goes through the same seam. The conditioning
scale is per row ([R] or a float), so rows of different requests -- with different
images, scales, or none (scale 0) -- share one call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import UNetConfig
from .layers import TimestepEmbedding
from .unet import DownBlock, MidBlock, embed_time

_CN_FIELDS = {"conditioning_channels", "conditioning_embedding_out_channels", "controlnet_conditioning_channel_order",
              "global_pool_conditions"}


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the encoder's layout, read with the UNet's rules
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    channel_order: str = "rgb"
    global_pool_conditions: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        order = d.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet config: controlnet_conditioning_channel_order={order!r}; use 'rgb' or 'bgr'")
        rest = {k: v for k, v in d.items() if k not in _CN_FIELDS}
        down = rest.get("down_block_types", UNetConfig.down_block_types)
        rest.setdefault("up_block_types", [t.replace("Down", "Up") for t in reversed(down)])  # no decoder: a mirror
        unet = UNetConfig.from_dict(rest)
        return cls(unet, d.get("conditioning_channels", 3),
                   tuple(d.get("conditioning_embedding_out_channels", cls.conditioning_embedding_out_channels)),
                   order, bool(d.get("global_pool_conditions", False)))

    @classmethod
    def from_file(cls, path: str | Path) -> "ControlNetConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read ControlNet config {path}: {e}") from e


class ConditioningEmbedding(nn.Module):
    """Conditioning image [B, 3, H, W] -> features at the latent's size [B, C0, H/8, W/8]."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class ControlNetModel(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        cfg = config.unet
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        self.controlnet_cond_embedding = ConditioningEmbedding(ch[0], config.conditioning_channels,
                                                               config.conditioning_embedding_out_channels)
        self.down_blocks = nn.ModuleList()
        zero = [nn.Conv2d(ch[0], ch[0], 1)]  # one per skip connection: conv_in's, then each block's
        for i, kind in enumerate(cfg.down_block_types):
            last = i == len(ch) - 1
            self.down_blocks.append(DownBlock(cfg, i, ch[max(i - 1, 0)], ch[i], kind.startswith("CrossAttn"), last))
            zero += [nn.Conv2d(ch[i], ch[i], 1) for _ in range(cfg.layers_per_block[i] + (0 if last else 1))]
        self.controlnet_down_blocks = nn.ModuleList(zero)
        self.mid_block = MidBlock(cfg)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)
        # Its attention layers are not numbered: no plan reaches them (the UNet's indices are the plan's).

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                added_cond_kwargs=None, plan=None) -> tuple[list[Tensor], Tensor]:
        """sample [B, C, h, w], controlnet_cond [B, 3, H, W] in [0, 1] (RGB) -> (down residuals,
        mid residual), scaled by ``conditioning_scale`` (a float or [B])."""
        cfg = self.config.unet
        sample = sample.to(self.dtype)
        cond = controlnet_cond.to(self.dtype)
        if self.config.channel_order == "bgr":
            cond = cond.flip(1)
        temb = embed_time(self, cfg, sample, timestep, added_cond_kwargs)  # [B, 4*C0]
        x = self.conv_in(sample) + self.controlnet_cond_embedding(cond)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, encoder_hidden_states, plan)
            skips.extend(s)
        x = self.mid_block(x, temb, encoder_hidden_states, plan)
        down = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        if self.config.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        if isinstance(conditioning_scale, Tensor):
            s = conditioning_scale.to(mid.dtype).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
            return [d * s for d in down], mid * s
        return [d * conditioning_scale for d in down], mid * conditioning_scale
