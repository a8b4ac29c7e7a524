import json

import pytest

from engine.models.config import UNetConfig
from engine.tiny import sd15_unet_config, sdxl_unet_config


def test_sd15_heads_come_from_attention_head_dim():
    cfg = UNetConfig.from_dict(sd15_unet_config())
    assert cfg.attention_heads == (2, 2)
    assert cfg.layers_per_block == (2, 2)
    assert cfg.addition_embed_type is None


def test_sdxl_fields():
    cfg = UNetConfig.from_dict(sdxl_unet_config())
    assert cfg.attention_heads == (2, 4)
    assert cfg.transformer_layers_per_block == (1, 2)
    assert cfg.use_linear_projection and cfg.addition_embed_type == "text_time"


@pytest.mark.parametrize("field,value", [
    ("time_cond_proj_dim", 256),
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "image"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
])
def test_unsupported_values_name_the_field(field, value):
    d = sd15_unet_config() | {field: value}
    with pytest.raises(ValueError, match=field):
        UNetConfig.from_dict(d)


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="frobnicate"):
        UNetConfig.from_dict(sd15_unet_config() | {"frobnicate": 1})


def test_from_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(sdxl_unet_config() | {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1"}))
    assert UNetConfig.from_file(p).cross_attention_dim == (64, 64)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read UNet config"):
        UNetConfig.from_file(tmp_path / "bad.json")
