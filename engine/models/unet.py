"""Our UNet for the SD1.x/2.x and SDXL families (Rombach et al. 2022; Podell et al. 2023).

Same parameter names as diffusers' ``UNet2DConditionModel`` so its safetensors
load as they are; same call signature, plus ``plan`` (an :class:`AttentionPlan`)
that carries store/inject instructions to every attention layer. ``timestep``
is a tensor [B]: rows of one batch may sit at different timesteps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionPlan, number_attention_layers
from .config import UNetConfig
from .features import inject_features, number_feature_sites, site_named
from .layers import (
    BasicTransformerBlock, Downsample2D, ResnetBlock2D, TimestepEmbedding, Transformer2DModel, Upsample2D,
    checkpointed, timestep_embedding,
)


def transformers(cfg: UNetConfig, level: int, channels: int, n: int) -> nn.ModuleList:
    """The ``attentions`` of a block at ``level`` (index into the per-down-block lists)."""
    return nn.ModuleList([
        Transformer2DModel(channels, cfg.attention_heads[level], cfg.cross_attention_dim[level],
                           cfg.transformer_layers_per_block[level], cfg.norm_num_groups, cfg.use_linear_projection)
        for _ in range(n)
    ])


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with ``attentions``) or DownBlock2D (without)."""

    def __init__(self, cfg: UNetConfig, i: int, cin: int, cout: int, cross: bool, last: bool):
        super().__init__()
        n, g, eps = cfg.layers_per_block[i], cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if j == 0 else cout, cout, cfg.time_embed_dim, g, eps) for j in range(n)]
        )
        self.attentions = transformers(cfg, i, cout, n) if cross else None
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(cout)])

    def forward(self, x, temb, context, plan):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = inject_features(resnet(x, temb), resnet.site, plan)
            if self.attentions is not None:
                x = self.attentions[j](x, context, plan)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c, g, eps = cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps
        self.attentions = transformers(cfg, len(cfg.block_out_channels) - 1, c, 1)
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, cfg.time_embed_dim, g, eps) for _ in range(2)])

    def forward(self, x, temb, context, plan):
        x = inject_features(self.resnets[0](x, temb), self.resnets[0].site, plan)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = inject_features(resnet(attn(x, context, plan), temb), resnet.site, plan)
        return x


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D or UpBlock2D: each resnet eats one skip connection."""

    def __init__(self, cfg: UNetConfig, i: int, cin: int, cprev: int, cout: int, cross: bool, last: bool):
        super().__init__()
        rev = len(cfg.block_out_channels) - 1 - i  # index into the per-down-block lists
        n, g, eps = cfg.layers_per_block[rev] + 1, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([
            ResnetBlock2D((cprev if j == 0 else cout) + (cin if j == n - 1 else cout), cout, cfg.time_embed_dim, g, eps)
            for j in range(n)
        ])
        self.attentions = transformers(cfg, rev, cout, n) if cross else None
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(cout)])

    def forward(self, x, skips, temb, context, plan, size=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - j]], dim=1), temb)  # [B, C + Cskip, H, W] -> [B, Cout, H, W]
            x = inject_features(x, resnet.site, plan)
            if self.attentions is not None:
                x = self.attentions[j](x, context, plan)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


def embed_time(model: nn.Module, cfg: UNetConfig, sample, timestep, added_cond_kwargs=None):
    """The timestep embedding [B, 4*C0] (plus SDXL's text/size embedding) of ``model``, a UNet or
    a ControlNet (same modules, same names: ``time_embedding``, ``add_embedding``)."""
    b = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device)
    t = t.reshape(-1).expand(b) if t.numel() == 1 else t  # [B]
    temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = model.time_embedding(temb.to(sample.dtype))  # [B, 4*C0]
    if cfg.addition_embed_type == "text_time":
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError("this SDXL-family model needs added_cond_kwargs with 'text_embeds' and 'time_ids'")
        time_ids = added_cond_kwargs["time_ids"]  # [B, 6]
        tid = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        add = torch.cat([added_cond_kwargs["text_embeds"], tid.reshape(b, -1)], dim=-1)  # [B, Dpool + 6*Dt]
        temb = temb + model.add_embedding(add.to(temb.dtype))
    return temb


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], config.time_embed_dim)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, config.time_embed_dim)
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(config.down_block_types):
            cin = ch[max(i - 1, 0)]
            self.down_blocks.append(
                DownBlock(config, i, cin, ch[i], kind.startswith("CrossAttn"), i == len(ch) - 1)
            )
        self.mid_block = MidBlock(config)
        self.up_blocks = nn.ModuleList()
        rch = ch[::-1]
        for i, kind in enumerate(config.up_block_types):
            cin = rch[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(
                UpBlock(config, i, cin, rch[max(i - 1, 0)], rch[i], kind.startswith("CrossAttn"), i == len(ch) - 1)
            )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)
        self.attn_layers = number_attention_layers(self, self._scale_of)
        self.feature_sites = number_feature_sites(self, {ResnetBlock2D: "resnet", BasicTransformerBlock: "block"})
        self.gradient_checkpointing = False  # with autograd: recompute each block's activations in backward

    def _block(self, block, *args):
        return checkpointed(block, *args) if self.gradient_checkpointing else block(*args)

    def site(self, name: str):
        """The :class:`FeatureSite` of the module at ``name`` (e.g. "up_blocks.1.resnets.1")."""
        return site_named(self.feature_sites, name)

    def _scale_of(self, name: str) -> int:
        """Spatial downsampling of the module at ``name`` relative to the latent."""
        n = len(self.config.block_out_channels)
        kind, i = name.split(".")[0], int(name.split(".")[1]) if name.startswith(("down", "up")) else 0
        level = {"down_blocks": i, "mid_block": n - 1, "up_blocks": n - 1 - i}[kind]
        return 2**level

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                plan: AttentionPlan | None = None, return_dict: bool = False,
                down_block_additional_residuals=None, mid_block_additional_residual=None):
        """sample [B, C, H, W], timestep [B] (or scalar), encoder_hidden_states [B, L, Dctx].

        SDXL needs ``added_cond_kwargs = {"text_embeds": [B, Dpool], "time_ids": [B, 6]}``.
        ControlNet residuals (``engine.models.controlnet``) are added to the skip connections
        and to the mid block's output, as diffusers does.
        Returns the model output [B, C, H, W] (``return_dict`` is accepted for diffusers
        compatibility and ignored: the output is always the tensor).
        """
        cfg = self.config
        # Samplers keep the latent in float32 (half precision loses the small per-step
        # updates); the UNet input is the one place it takes the weights' dtype.
        sample = sample.to(self.dtype)
        temb = embed_time(self, cfg, sample, timestep, added_cond_kwargs)  # [B, 4*C0]

        # Upsampling to explicit sizes when the latent is not a multiple of the total stride.
        n_up = len(self.up_blocks) - 1
        explicit = any(s % (2 ** n_up) for s in sample.shape[-2:])

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, s = self._block(block, x, temb, encoder_hidden_states, plan)
            skips.extend(s)
        x = self._block(self.mid_block, x, temb, encoder_hidden_states, plan)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if explicit and i < n_up else None
            x = self._block(block, x, mine, temb, encoder_hidden_states, plan, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
