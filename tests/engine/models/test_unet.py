"""Our UNet against diffusers' UNet2DConditionModel with the same random weights."""

import pytest
import torch

from engine.models.config import UNetConfig
from engine.models.unet import UNet2DConditionModel
from engine.tiny import build_diffusers_pipeline


def _pair(arch):
    ref = build_diffusers_pipeline(arch, seed=1).unet.eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config)))
    missing, unexpected = ours.load_state_dict(ref.state_dict(), assign=True, strict=True)
    assert not missing and not unexpected
    return ref, ours.eval()


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pair(request):
    return request.param, *_pair(request.param)


def _inputs(arch, cfg, b, size, gen):
    x = torch.randn(b, 4, *size, generator=gen)  # [B, 4, h, w]
    ctx = torch.randn(b, 77, cfg.cross_attention_dim[0], generator=gen)  # [B, 77, Dctx]
    kw = {}
    if arch == "sdxl":
        time_ids = torch.tensor([[64.0, 48, 0, 8, 64, 64]]).repeat(b, 1)
        kw = dict(added_cond_kwargs={"text_embeds": torch.randn(b, 32, generator=gen), "time_ids": time_ids})
    return x, ctx, kw


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("size", [(16, 16), (12, 8), (9, 7)])
def test_rows_at_different_timesteps_match_diffusers(pair, size):
    arch, ref, ours = pair
    gen = torch.Generator().manual_seed(0)
    x, ctx, kw = _inputs(arch, ours.config, 4, size, gen)
    t = torch.tensor([999, 501, 10, 0])  # every row its own timestep
    with torch.no_grad():
        want = ref(x, t, ctx, **kw).sample
        got = ours(x, t, ctx, **kw)
    assert got.shape == want.shape
    assert _rel(want, got) <= 1e-5


def test_cfg_batch_matches_diffusers(pair):
    """A classifier-free-guidance batch: the same latents twice, shared scalar timestep."""
    arch, ref, ours = pair
    gen = torch.Generator().manual_seed(1)
    x, ctx, kw = _inputs(arch, ours.config, 2, (16, 16), gen)
    x = torch.cat([x[:1], x[:1]])
    with torch.no_grad():
        want = ref(x, 421, ctx, **kw).sample
        got = ours(x, torch.tensor(421), ctx, **kw)
    assert _rel(want, got) <= 1e-5


def test_every_attention_layer_is_numbered(pair):
    arch, ref, ours = pair
    layers = ours.attn_layers
    assert [l.index for l in layers] == list(range(len(layers)))
    assert {l.place for l in layers} <= {"down", "mid", "up"}
    assert sum(l.cross for l in layers) == len(layers) // 2


def test_sdxl_without_added_conditioning_is_a_clear_error():
    _, ours = _pair("sdxl")
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        ours(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 77, 64))


def test_attention_layer_scales_match_the_query_count(pair):
    """AttnLayer.scale predicts how many queries each layer sees (to size store buffers)."""
    arch, ref, ours = pair
    import engine.models.attention as A

    seen = {}
    x, ctx, kw = _inputs(arch, ours.config, 1, (16, 8), torch.Generator().manual_seed(0))
    for mod in ours.modules():
        if isinstance(mod, A.Attention):
            mod.register_forward_hook(lambda m, a, o: seen.__setitem__(m.layer.index, a[0].shape[1]))
    with torch.no_grad():
        ours(x, torch.tensor([5]), ctx, **kw)
    for layer in ours.attn_layers:
        assert seen[layer.index] == (16 // layer.scale) * (8 // layer.scale)
