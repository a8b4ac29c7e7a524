"""FLUX transformer configuration read from a diffusers ``transformer/config.json``.

FLUX.1-dev (guidance embedding) and FLUX.1-schnell shapes, and smaller models of the same
architecture (the bundled Shapes DiT). Fields that change the architecture in ways our
executor does not implement must hold diffusers' default; anything else raises an error
naming the field, at load time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

_FIXED = {"patch_size": (1, "patches larger than 1 (FLUX packs 2x2 latents itself)")}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5's width
    pooled_projection_dim: int = 768  # CLIP's pooled width
    guidance_embeds: bool = False  # FLUX.1-dev: a guidance value is embedded like the timestep
    axes_dims_rope: tuple = (16, 56, 56)

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {list(self.axes_dims_rope)} must add up to attention_head_dim "
                             f"{self.attention_head_dim}")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {list(self.axes_dims_rope)} must be even (rotary pairs)")
        if self.in_channels % 4:
            raise ValueError(f"in_channels {self.in_channels} must be 4 x the latent channels (2x2 packing)")

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        """From a diffusers config dict; unknown or unsupported fields raise ValueError naming them."""
        names = {f.name for f in fields(cls)}
        kw = {}
        for key, value in d.items():
            if key in _IGNORED:
                continue
            if key in _FIXED:
                default, what = _FIXED[key]
                if value != default:
                    raise ValueError(f"transformer config: {key}={value!r} would enable {what}, which overpaint's "
                                     f"FLUX executor does not implement")
                continue
            if key not in names:
                raise ValueError(f"transformer config: unknown field {key!r}; overpaint supports FLUX.1 "
                                 f"(FluxTransformer2DModel) configs: {sorted(names | set(_FIXED))}")
            kw[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> "FluxConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
