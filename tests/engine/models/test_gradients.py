"""Gradients through the executor: our UNet vs diffusers', activation checkpointing, and
gradients through stored attention maps."""

import pytest
import torch

import kernels
from engine.models.attention import AttentionPlan, AttnLayer, attention

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pair(request, tiny_sd15_dir, tiny_sdxl_dir):
    import engine

    folder = tiny_sd15_dir if request.param == "sd15" else tiny_sdxl_dir
    ours = engine.load(folder).unet.requires_grad_(True)  # loaded for inference: parameters frozen until asked
    ref = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    return ours, ref


def _inputs(unet, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    ctx_dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    x = torch.randn(b, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(b, 5, ctx_dim, generator=g)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(b, pooled, generator=g), "time_ids": torch.rand(b, 6, generator=g) * 64}
    return x, torch.tensor([600, 100]), ctx, added


def _grads(model, x, t, ctx, added, ours: bool):
    model.zero_grad(set_to_none=True)
    x, ctx = x.clone().requires_grad_(), ctx.clone().requires_grad_()
    out = model(x, t, ctx, added) if ours else model(x, t, ctx, added_cond_kwargs=added).sample
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * w).sum().backward()
    params = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return x.grad, ctx.grad, params


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_input_and_parameter_gradients_match_diffusers(pair):
    ours, ref = pair
    args = _inputs(ours)
    gx, gc, gp = _grads(ours, *args, ours=True)
    rx, rc, rp = _grads(ref, *args, ours=False)
    assert _rel(gx, rx) <= 1e-5 and _rel(gc, rc) <= 1e-5
    assert set(gp) == set(rp)
    worst = max(_rel(gp[n], rp[n]) for n in rp if rp[n].abs().max() > 0)
    assert worst <= 1e-5, worst


def test_checkpointing_gives_the_same_gradients(pair):
    ours, _ = pair
    args = _inputs(ours, seed=1)
    want = _grads(ours, *args, ours=True)
    ours.gradient_checkpointing = True
    try:
        got = _grads(ours, *args, ours=True)
    finally:
        ours.gradient_checkpointing = False
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=0, atol=0)


def test_gradient_through_stored_maps_is_the_explicit_softmax_gradient():
    """A loss on the head-averaged maps the seam stores (pix2pix-zero's cross-attention
    guidance) has the gradient of the same loss on an explicit softmax."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 16, 32, generator=g, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(2, 2, 7, 32, generator=g).requires_grad_()
    v = torch.randn(2, 2, 7, 32, generator=g)
    target = torch.rand(2, 16, 7, generator=g)
    layer = AttnLayer(0, "c", True, "down", 1)
    store = torch.zeros(2, 16, 7)
    attention(q, k, v, layer, AttentionPlan(store={0: store}))
    assert store.requires_grad  # the maps carry the graph
    ((store - target) ** 2).sum().backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    maps = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, -1).mean(1)  # [B, Nq, Nk]
    ((maps - target) ** 2).sum().backward()
    torch.testing.assert_close(gq, q.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gk, k.grad, rtol=1e-5, atol=1e-7)


def test_autograd_calls_take_the_differentiable_path():
    q = torch.randn(1, 1, 4, 16, requires_grad=True)
    k = v = torch.randn(1, 1, 4, 16)
    assert kernels.needs_grad(q, k, v)
    with torch.no_grad():
        assert not kernels.needs_grad(q, k, v)
    assert not kernels.needs_grad(q.detach(), k, v)
