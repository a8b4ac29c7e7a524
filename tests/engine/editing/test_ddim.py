"""DDIM inversion against a loop over diffusers' DDIMInverseScheduler, and DDIM edits."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline


def _diffusers_inversion(ref, x0, steps, prompt, scale, sdxl=False, size=64):
    sch = DDIMInverseScheduler.from_config(ref.scheduler.config)
    sch.set_timesteps(steps)
    enc = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=scale > 1)
    kw = {}
    if sdxl:
        cond, uncond, pooled, npooled = enc
        ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        if scale > 1:
            cond, pooled, ids = torch.cat([uncond, cond]), torch.cat([npooled, pooled]), ids.repeat(2, 1)
        kw = dict(added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
    else:
        cond, uncond = enc
        if scale > 1:
            cond = torch.cat([uncond, cond])
    x = x0.clone()
    for t in sch.timesteps:
        xin = torch.cat([x, x]) if scale > 1 else x
        out = ref.unet(xin, t, cond, **kw).sample
        if scale > 1:
            u, c = out.chunk(2)
            out = u + scale * (c - u)
        x = sch.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_ddim_inversion_matches_diffusers_inverse_scheduler(sd15_pipe, tiny_sd15_dir, image, scale):
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    inv = sd15_pipe.invert(image, "a red circle", method="ddim", steps=10, guidance_scale=scale, progress=False)
    want = _diffusers_inversion(ref, inv.x0, 10, "a red circle", scale)
    torch.testing.assert_close(inv.latents[0], want, atol=1e-5, rtol=1e-5)
    assert inv.latents.shape == (11, 1, 4, 32, 32)
    torch.testing.assert_close(inv.latents[-1], inv.x0, atol=0, rtol=0)


def test_ddim_inversion_matches_diffusers_sdxl(sdxl_pipe, tiny_sdxl_dir, image):
    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    inv = sdxl_pipe.invert(image, "a cat", method="ddim", steps=8, guidance_scale=2.0, progress=False)
    want = _diffusers_inversion(ref, inv.x0, 8, "a cat", 2.0, sdxl=True)
    torch.testing.assert_close(inv.latents[0], want, atol=1e-5, rtol=1e-5)


def test_trajectory_is_aligned_with_denoising_steps(sd15_pipe, image):
    """latents[j] sits at the noise level of denoising step j: it is the output of the
    inverse step that landed on timesteps[j]."""
    from engine.sampling import make_sampler

    inv = sd15_pipe.invert(image, "", method="ddim", steps=7, progress=False)
    inverse = make_sampler("ddim_inverse", sd15_pipe.schedule, 7)
    torch.testing.assert_close(inv.timesteps, inverse.timesteps.flip(0), atol=0, rtol=0)
    assert inv.timesteps[0] > inv.timesteps[-1]
    # One inverse step from x0 at the first inverse timestep gives latents[S-1].
    g = sd15_pipe.guidance("", None, 1.0, 64, 64)
    t = inverse.timesteps[0].expand(1)
    x1, _ = inverse.step(0, inv.x0, sd15_pipe.denoiser.guided(g, 64, 64)(inv.x0, t))
    torch.testing.assert_close(inv.latents[-2], x1, atol=0, rtol=0)


def test_ddim_edit_is_plain_regeneration_from_the_inverted_noise(sd15_pipe, image):
    inv = sd15_pipe.invert(image, "a circle", method="ddim", steps=5, guidance_scale=1.0, progress=False)
    got = sd15_pipe.edit(inv, "ddim", "a square", guidance_scale=4.0, output_type="pt", progress=False)
    from engine.sampling import make_sampler
    from engine.step import sample

    g = sd15_pipe.guidance("a square", None, 4.0, 64, 64)
    want = sample(sd15_pipe.denoiser.guided(g, 64, 64), inv.latents[0], make_sampler("ddim", sd15_pipe.schedule, 5), progress=False)
    torch.testing.assert_close(got, sd15_pipe.decode(want), atol=0, rtol=0)


def test_batch_of_images_with_one_prompt_each(sd15_pipe, image):
    two = torch.cat([image, image.flip(-1)])
    inv = sd15_pipe.invert(two, ["a", "b"], method="ddim", steps=3, progress=False)
    assert inv.latents.shape[1] == 2 and len(inv.source) == 2
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        sd15_pipe.invert(two, ["a", "b", "c"], method="ddim", steps=3, progress=False)
