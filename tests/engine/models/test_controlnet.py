"""Our ControlNet (engine.models.controlnet) against diffusers' ControlNetModel + UNet2DConditionModel,
and ControlNet rows in the batched step."""

import pytest
import torch

from engine.loading.modules import load_controlnet

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def case(request, tiny_sd15_dir, tiny_sdxl_dir, sd15_pipe, sdxl_pipe, tmp_path_factory):
    """(our pipeline, diffusers UNet, diffusers ControlNet, our ControlNet) with the same random weights."""
    folder, pipe = (tiny_sd15_dir, sd15_pipe) if request.param == "sd15" else (tiny_sdxl_dir, sdxl_pipe)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    torch.manual_seed(0)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))  # 2x: the tiny VAE factor.eval()
    with torch.no_grad():  # the zero convolutions start at zero: give them weights, or nothing is compared
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("cn") / request.param
    cn.save_pretrained(out, safe_serialization=True)
    return pipe, unet, cn, load_controlnet(out, torch.device("cpu"), torch.float32), (folder, out)


def _inputs(unet, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(b, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(b, 5, cfg.cross_attention_dim, generator=g)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(b, pooled, generator=g), "time_ids": torch.rand(b, 6, generator=g) * 64}
    image = torch.rand(b, 3, 16, 16, generator=g)  # the 8x8 latent at the tiny VAE factor 2
    return x, torch.tensor([700, 200]), ctx, added, image


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def test_residuals_and_unet_output_match_diffusers(case):
    pipe, unet, cn, ours, _ = case
    x, t, ctx, added, image = _inputs(unet)
    kw = {} if added is None else {"added_cond_kwargs": added}
    down_d, mid_d = cn(x, t, ctx, image, conditioning_scale=0.7, return_dict=False, **kw)
    down_o, mid_o = ours(x, t, ctx, image, 0.7, added)
    assert len(down_o) == len(down_d)
    for a, b in zip(down_o, down_d):
        assert _rel(a, b) <= 1e-5
    assert _rel(mid_o, mid_d) <= 1e-5 and mid_d.abs().max() > 0
    want = unet(x, t, ctx, down_block_additional_residuals=down_d, mid_block_additional_residual=mid_d, **kw).sample
    got = pipe.unet(x, t, ctx, added, down_block_additional_residuals=down_o, mid_block_additional_residual=mid_o)
    assert _rel(got, want) <= 1e-5
    plain = unet(x, t, ctx, **kw).sample
    assert _rel(want, plain) > 1e-3  # the residuals do change the output


@torch.no_grad()
def test_per_row_scales_in_one_call(case):
    """Rows with different images and scales share a call; a row at scale 0 is the plain UNet."""
    pipe, unet, cn, ours, _ = case
    x, t, ctx, added, image = _inputs(unet)
    scale = torch.tensor([0.0, 1.3])
    down, mid = ours(x, t, ctx, image, scale, added)
    alone = ours(x[1:], t[1:], ctx[1:], image[1:], 1.3, None if added is None else {k: v[1:] for k, v in added.items()})
    for a, b in zip(down, alone[0]):
        torch.testing.assert_close(a[1:], b, rtol=1e-4, atol=1e-5)  # batch-size rounding only
        assert a[0].abs().max() == 0


def test_cli_generate_with_controlnet(case, tmp_path):
    from PIL import Image

    from engine.cli import main

    *_, (folder, cn_folder) = case
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(tmp_path / "edges.png")
    out = tmp_path / "o.png"
    assert main(["generate", "--model", str(folder), "--prompt", "a cat", "-o", str(out), "--steps", "1",
                 "--controlnet", str(cn_folder), "--control-image", str(tmp_path / "edges.png"), "--no-progress"]) == 0
    assert out.exists()


def test_generate_with_control_through_the_pipeline(case):
    """Through engine.load + load_controlnet: scale 0 is exactly the plain pipeline; a control
    image changes the image; a controlled and an uncontrolled request share calls and each
    matches its own run alone."""
    import engine

    plain_pipe, *_, (folder, cn_folder) = case
    pipe = engine.load(folder)
    pipe.load_controlnet(cn_folder)
    g = torch.Generator().manual_seed(5)
    control = torch.rand(1, 3, 32, 32, generator=g)
    kw = dict(steps=2, guidance_scale=3.0, seed=4, height=32, width=32, output_type="pt", progress=False)
    plain = plain_pipe.generate("a cat", **kw)
    assert torch.equal(pipe.generate("a cat", control_image=control, controlnet_conditioning_scale=0.0, **kw), plain)
    controlled = pipe.generate("a cat", control_image=control, **kw)
    assert (controlled - plain).abs().max() > 1e-3
    calls = []
    h = pipe.controlnet.register_forward_hook(lambda m, a, out: calls.append(len(a[0])))  # observes only
    try:  # a call with no controlled row skips the ControlNet
        assert torch.equal(pipe.generate("a cat", **kw), plain) and calls == []
    finally:
        h.remove()
    req = {k: v for k, v in kw.items() if k not in ("output_type", "progress")}
    both = pipe.edit_many([dict(prompt="a cat", control_image=control, **req), dict(prompt="a cat", **req)],
                          output_type="pt")
    torch.testing.assert_close(both[0], controlled, rtol=0, atol=1e-4)
    torch.testing.assert_close(both[1], plain, rtol=0, atol=1e-4)
    keyed = pipe.generate("a cat", control_image=control, chroma_key="green", **kw)  # TKG-DM with ControlNet
    assert keyed.isfinite().all() and not torch.equal(keyed, controlled)
    with pytest.raises(ValueError, match="load_controlnet"):
        plain_pipe.generate("a cat", control_image=control, **kw)


def test_generate_matches_diffusers_controlnet_pipeline(case):
    """pipe.generate with a ControlNet vs diffusers' StableDiffusion(XL)ControlNetPipeline: same
    weights, latents, control image and scale."""
    import numpy as np

    import engine

    plain_pipe, unet, cn, _, (folder, cn_folder) = case
    sdxl = plain_pipe.arch == "sdxl"
    cls = diffusers.StableDiffusionXLControlNetPipeline if sdxl else diffusers.StableDiffusionControlNetPipeline
    ref = cls.from_pretrained(folder, controlnet=diffusers.ControlNetModel.from_pretrained(cn_folder))
    ours = engine.load(folder)
    ours.load_controlnet(cn_folder)
    size = 32
    g = torch.Generator().manual_seed(7)
    lat = torch.randn(1, 4, size // ours.vae_scale_factor, size // ours.vae_scale_factor, generator=g)
    control = torch.rand(1, 3, size, size, generator=g)
    want = ref("a red circle", image=control, latents=lat.clone(), num_inference_steps=4, guidance_scale=5.0,
               controlnet_conditioning_scale=0.8, height=size, width=size, output_type="np").images
    got = ours.generate("a red circle", control_image=control, controlnet_conditioning_scale=0.8, latents=lat.clone(),
                        steps=4, guidance_scale=5.0, height=size, width=size, output_type="np", progress=False)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4
