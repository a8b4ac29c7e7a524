"""EVA02-CLIP's vision tower (engine.models.eva_clip), tiny and random, against the official forward
written out (explicit rotary angles per patch, float64 softmax), and its published weight layout."""
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from engine.models.eva_clip import EvaVisionConfig, EvaVisionTower

CFG = EvaVisionConfig(image_size=42, patch_size=14, width=128, layers=6, heads=2, mlp_ratio=2.6667, embed_dim=48,
                      hidden_layers=(1, 2, 3, 4, 5))


def _random_tower(seed=0):
    torch.manual_seed(seed)
    tower = EvaVisionTower(CFG).eval()
    with torch.no_grad():
        for p in tower.parameters():  # LayerNorms and biases away from their 1 / 0 defaults
            p.add_(torch.randn_like(p) * 0.05)
    return tower


def _official(tower, images):
    """The official EVA ViT (eva_vit_model.py, rope.py), float64, written out independently."""
    cfg, sd = tower.config, {k: v.double() for k, v in tower.state_dict().items()}
    ln = lambda x, n: torch.nn.functional.layer_norm(x, x.shape[-1:], sd[f"{n}.weight"], sd[f"{n}.bias"], 1e-6)  # noqa: E731
    lin = lambda x, n, bias=True: x @ sd[f"{n}.weight"].T + (sd[f"{n}.bias"] if bias else 0)  # noqa: E731
    x = torch.nn.functional.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                                   stride=cfg.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1) + sd["pos_embed"]
    g, hd = cfg.grid, cfg.width // cfg.heads
    angle = torch.zeros(g * g, hd, dtype=torch.float64)
    for r in range(g):  # the first half of each head follows the patch's row, the second its column
        for c in range(g):
            for j in range(hd // 2):
                f = 1.0 / 10000 ** ((2 * (j // 2)) / (hd // 2))
                angle[r * g + c, j] = r / g * cfg.rope_pt_seq_len * f
                angle[r * g + c, hd // 2 + j] = c / g * cfg.rope_pt_seq_len * f

    def rope(t):
        rot = torch.empty_like(t)
        rot[..., 0::2], rot[..., 1::2] = -t[..., 1::2], t[..., 0::2]
        return t * angle.cos() + rot * angle.sin()

    hidden = []
    for i in range(cfg.layers):
        if i in cfg.hidden_layers:
            hidden.append(x)
        p = f"blocks.{i}."
        h = ln(x, p + "norm1")
        b, n, w = h.shape
        q = (h @ sd[p + "attn.q_proj.weight"].T + sd[p + "attn.q_bias"]).view(b, n, cfg.heads, hd).transpose(1, 2)
        k = (h @ sd[p + "attn.k_proj.weight"].T).view(b, n, cfg.heads, hd).transpose(1, 2)
        v = (h @ sd[p + "attn.v_proj.weight"].T + sd[p + "attn.v_bias"]).view(b, n, cfg.heads, hd).transpose(1, 2)
        q = torch.cat([q[:, :, :1], rope(q[:, :, 1:])], 2)
        k = torch.cat([k[:, :, :1], rope(k[:, :, 1:])], 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        x = x + lin(ln(a.transpose(1, 2).reshape(b, n, w), p + "attn.inner_attn_ln"), p + "attn.proj")
        h = ln(x, p + "norm2")
        m = torch.nn.functional.silu(lin(h, p + "mlp.w1")) * lin(h, p + "mlp.w2")
        x = x + lin(ln(m, p + "mlp.ffn_ln"), p + "mlp.w3")
    return lin(ln(x, "norm")[:, 0], "head"), hidden


@torch.no_grad()
def test_matches_the_official_forward():
    tower = _random_tower()
    images = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    emb, hidden = tower(images)
    want, want_hidden = _official(tower, images)
    assert emb.shape == (2, 48) and len(hidden) == 5 and hidden[0].shape == (2, 10, 128)
    torch.testing.assert_close(emb.double(), want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(hidden, want_hidden):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_published_layout_round_trip(tmp_path):
    tower = _random_tower()
    sd = tower.to_state_dict()
    assert "visual.blocks.0.attn.q_proj.weight" in sd and "visual.blocks.5.mlp.w3.weight" in sd
    assert "visual.blocks.0.attn.q_bias" in sd and "visual.blocks.0.attn.k_bias" not in sd
    extra = {"text.token_embedding.weight": torch.zeros(3, 4), "logit_scale": torch.zeros(()),
             "visual.rope.freqs_cos": torch.zeros(9, 64), "visual.blocks.0.attn.rope.freqs_sin": torch.zeros(9, 64)}
    save_file({**sd, **extra}, str(tmp_path / "eva.safetensors"))
    again = EvaVisionTower.from_file(tmp_path / "eva.safetensors", hidden_layers=(1, 2, 3, 4, 5))
    assert again.config.mlp_hidden == CFG.mlp_hidden  # the ratio is read back as hidden / width
    assert replace(again.config, mlp_ratio=CFG.mlp_ratio) == CFG
    images = torch.randn(1, 3, 42, 42)
    torch.testing.assert_close(again(images)[0], tower(images)[0], rtol=0, atol=0)


def test_clear_errors(tmp_path):
    tower = _random_tower()
    with pytest.raises(ValueError, match="takes 42x42 images"):
        tower(torch.zeros(1, 3, 32, 32))
    (tmp_path / "eva.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="only .safetensors checkpoints load here"):
        EvaVisionTower.from_file(tmp_path / "eva.pt")
    sd = tower.to_state_dict()
    del sd["visual.head.weight"]
    with pytest.raises(ValueError, match="not an EVA-CLIP vision tower: missing 'visual.head.weight'"):
        EvaVisionTower.from_state_dict(sd)


def test_the_full_size_config_is_eva02_l_14_336():
    cfg = EvaVisionConfig()
    assert (cfg.grid, cfg.mlp_hidden, cfg.width // cfg.heads) == (24, 2730, 64)
