"""UNet configuration read from a diffusers ``unet/config.json``.

Only the fields of the SD1.x/2.x and SDXL families are supported. Every other
field must hold diffusers' default value; anything else raises an error that
names the field, so an unsupported checkpoint fails at load time rather than
producing silently wrong images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Fields we accept only at diffusers' default: (value, what the field would enable).
_FIXED = {
    "center_input_sample": (False, "input centring"),
    "only_cross_attention": (False, "cross-attention-only transformer blocks"),
    "downsample_padding": (1, "a different downsample padding"),
    "mid_block_scale_factor": (1, "a mid-block output scale"),
    "act_fn": ("silu", "another activation"),
    "encoder_hid_dim": (None, "an encoder hidden projection"),
    "encoder_hid_dim_type": (None, "an encoder hidden projection"),
    "dual_cross_attention": (False, "dual cross-attention"),
    "class_embed_type": (None, "class embeddings"),
    "num_class_embeds": (None, "class embeddings"),
    "resnet_time_scale_shift": ("default", "scale-shift time conditioning"),
    "resnet_skip_time_act": (False, "skip-time activation"),
    "resnet_out_scale_factor": (1.0, "a ResNet output scale"),
    "time_embedding_type": ("positional", "Fourier time embeddings"),
    "time_embedding_dim": (None, "a custom time embedding width"),
    "time_embedding_act_fn": (None, "a time embedding activation"),
    "timestep_post_act": (None, "a post-timestep activation"),
    "time_cond_proj_dim": (None, "guidance-embedding conditioning (LCM)"),
    "conv_in_kernel": (3, "another conv_in kernel"),
    "conv_out_kernel": (3, "another conv_out kernel"),
    "attention_type": ("default", "gated (GLIGEN) attention"),
    "class_embeddings_concat": (False, "concatenated class embeddings"),
    "mid_block_only_cross_attention": (None, "a cross-attention-only mid block"),
    "cross_attention_norm": (None, "cross-attention normalisation"),
    "num_attention_heads": (None, "num_attention_heads (diffusers' UNet rejects it too)"),
    "dropout": (0.0, "dropout (inference runs without it)"),
}
# Present in configs but without effect on inference.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size", "addition_embed_type_num_heads"}


def _per_block(value, n: int, name: str) -> tuple:
    """Broadcast an int (or keep a per-block list) to one entry per down block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"unet config: {name} has {len(value)} entries but there are {n} down blocks")
        return tuple(value)
    return (value,) * n


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] = (1280,) * 4
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    reverse_transformer_layers_per_block: tuple[int, ...] | None = None
    # Heads per block. diffusers' config calls this ``attention_head_dim`` (a
    # historical misnomer it keeps for compatibility); head width = channels / heads.
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    sample_size: int | None = field(default=None, compare=False)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Validate a diffusers UNet config dict and turn it into a UNetConfig."""
        known = {f.name for f in fields(cls)} | set(_FIXED) | _IGNORED | {"attention_head_dim"}
        for key in d:
            if key not in known:
                raise ValueError(f"unet config: unsupported field {key!r}; overpaint's UNet supports the SD1.x/2.x and SDXL families")
        for key, (default, what) in _FIXED.items():
            value = d.get(key, default)
            if isinstance(value, list) and key == "only_cross_attention":
                value = any(value)
            if value != default:
                raise ValueError(f"unet config: {key}={value!r} ({what}) is not supported; only {default!r} is")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        down = tuple(d.get("down_block_types", cls.down_block_types))
        up = tuple(d.get("up_block_types", cls.up_block_types))
        for name, types, allowed in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
            bad = [t for t in types if t not in allowed]
            if bad or len(types) != n:
                raise ValueError(f"unet config: {name}={list(types)} unsupported; use {n} of {allowed}")
        mid = d.get("mid_block_type", cls.mid_block_type)
        if mid != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"unet config: mid_block_type={mid!r} unsupported; only 'UNetMidBlock2DCrossAttn' is")
        add = d.get("addition_embed_type")
        if add not in (None, "text_time"):
            raise ValueError(f"unet config: addition_embed_type={add!r} unsupported; use None or 'text_time' (SDXL)")
        if add == "text_time" and (d.get("addition_time_embed_dim") is None or d.get("projection_class_embeddings_input_dim") is None):
            raise ValueError("unet config: addition_embed_type='text_time' needs addition_time_embed_dim and projection_class_embeddings_input_dim")
        tlpb = d.get("transformer_layers_per_block", 1)
        if isinstance(tlpb, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in tlpb):
            raise ValueError("unet config: nested transformer_layers_per_block is not supported")
        rev = d.get("reverse_transformer_layers_per_block")
        if rev is not None:
            raise ValueError("unet config: reverse_transformer_layers_per_block is not supported")
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(d.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=_per_block(d.get("layers_per_block", 2), n, "layers_per_block"),
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            cross_attention_dim=_per_block(d.get("cross_attention_dim", 1280), n, "cross_attention_dim"),
            transformer_layers_per_block=_per_block(tlpb, n, "transformer_layers_per_block"),
            attention_heads=_per_block(d.get("attention_head_dim", 8), n, "attention_head_dim"),
            use_linear_projection=d.get("use_linear_projection", False),
            upcast_attention=d.get("upcast_attention", False),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            addition_embed_type=add,
            addition_time_embed_dim=d.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim"),
            sample_size=d.get("sample_size"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "UNetConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read UNet config {path}: {e}") from e
        return cls.from_dict(d)
