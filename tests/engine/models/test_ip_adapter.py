"""IP-Adapter (engine.models.ip_adapter) against diffusers' UNet after ``_load_ip_adapter_weights``,
plain and plus, SD- and SDXL-shaped; the published file layout; per-layer scales."""

import pytest
import torch

from engine.models.ip_adapter import (
    IPAdapter, ImageProjection, Resampler, context_dim, cross_layers, from_state_dict, to_state_dict,
)

diffusers = pytest.importorskip("diffusers")

EMBED = 24  # the tiny image encoder's width (pooled for plain, hidden states for plus)


def random_adapter(unet, kind: str, seed: int = 0, tokens: int = 4) -> dict:
    """A random IP-Adapter for ``unet`` in the published layout (``image_proj.*``, ``ip_adapter.*``)."""
    torch.manual_seed(seed)
    cross = context_dim(unet)
    proj = ImageProjection(EMBED, cross, tokens) if kind == "plain" else Resampler(EMBED, 64, cross, tokens, 4, 1)  # depth 4: diffusers builds 4
    adapter = IPAdapter(proj, cross_layers(unet), cross, kind)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    return to_state_dict(adapter, unet)


def _split(state: dict) -> dict:
    return {part: {k.removeprefix(part + "."): v for k, v in state.items() if k.startswith(part + ".")}
            for part in ("image_proj", "ip_adapter")}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def case(request, tiny_sd15_dir, tiny_sdxl_dir, sd15_pipe, sdxl_pipe):
    folder, pipe = (tiny_sd15_dir, sd15_pipe) if request.param == "sd15" else (tiny_sdxl_dir, sdxl_pipe)
    return pipe, folder


def _inputs(cfg, kind, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(b, 5, cfg.cross_attention_dim, generator=g)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(b, pooled, generator=g), "time_ids": torch.rand(b, 6, generator=g) * 64}
    embeds = torch.randn(b, EMBED, generator=g) if kind == "plain" else torch.randn(b, 7, EMBED, generator=g)
    return x, torch.tensor([700, 200]), ctx, added, embeds


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", ["plain", "plus"])
@torch.no_grad()
def test_unet_with_ip_adapter_matches_diffusers(case, kind):
    pipe, folder = case
    state = random_adapter(pipe.unet, kind)
    if kind == "plus":  # the published Resampler names, which diffusers converts
        assert {"image_proj.latents", "image_proj.layers.3.0.to_kv.weight", "image_proj.layers.0.1.3.weight",
                "image_proj.layers.0.0.norm2.bias"} <= set(state)
    ref = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    ref._load_ip_adapter_weights(_split(state))
    adapter = from_state_dict(pipe.unet, state)
    assert adapter.kind == kind
    x, t, ctx, added, embeds = _inputs(ref.config, kind)
    kw = {} if added is None else dict(added)
    want = ref(x, t, ctx, added_cond_kwargs={**kw, "image_embeds": [embeds[:, None]]}).sample
    tokens = adapter.project(embeds)  # [B, T, Dctx]
    plan = adapter.plan(tokens, torch.ones(2))
    got = pipe.unet(x, t, ctx, added, plan=plan)
    assert _rel(got, want) <= 1e-5
    plain = pipe.unet(x, t, ctx, added)
    assert _rel(plain, want) > 1e-3  # the image tokens do change the output

    # per-row scales: row 0 at 0.5, row 1 without the image
    for proc in ref.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.5]
    half = ref(x[:1], t[:1], ctx[:1], added_cond_kwargs={**{k: v[:1] for k, v in kw.items()},
                                                         "image_embeds": [embeds[:1, None]]}).sample
    got = pipe.unet(x, t, ctx, added, plan=adapter.plan(tokens, torch.tensor([0.5, 0.0])))
    assert _rel(got[:1], half) <= 1e-5
    assert torch.equal(got[1:], plain[1:])  # scale 0: exactly the text attention


@torch.no_grad()
def test_layer_scales(sd15_pipe):
    unet = sd15_pipe.unet
    adapter = from_state_dict(unet, random_adapter(unet, "plain"))
    names = adapter.names
    adapter.set_scale({"up": {"block_1": [0.0, 1.0, 0.0]}})
    on = [n for n, s in zip(names, adapter.scales) if s]
    assert on == [n for n in names if n.startswith("up_blocks.1.attentions.1.")]
    adapter.set_scale({"mid_block": 0.3})
    assert [s for n, s in zip(names, adapter.scales) if s] == [0.3] * sum(n.startswith("mid_block") for n in names)
    plan = adapter.plan(torch.zeros(1, 4, 32), torch.ones(1))
    assert set(plan.ip) == {l.index for l, _, _ in cross_layers(unet) if l.name.startswith("mid_block")}
    with pytest.raises(ValueError, match="names no cross-attention layer"):
        adapter.set_scale({"up_blocks.9": 1.0})
    adapter.set_scale(1.0)
    assert adapter.scales == [1.0] * len(names)


def test_wrong_family_and_file_errors(sd15_pipe, sdxl_pipe):
    state = random_adapter(sd15_pipe.unet, "plain")
    with pytest.raises(ValueError, match="another model family"):
        from_state_dict(sdxl_pipe.unet, state)
    with pytest.raises(ValueError, match="not an IP-Adapter file"):
        from_state_dict(sd15_pipe.unet, {"foo": torch.zeros(1)})
    extra = dict(state, **{"ip_adapter.99.to_k_ip.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="another UNet"):
        from_state_dict(sd15_pipe.unet, extra)
