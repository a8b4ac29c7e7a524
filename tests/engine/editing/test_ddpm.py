"""Edit-friendly DDPM inversion: exact reconstruction, batched == sequential."""

import pytest
import torch

from engine.editing import editor


def test_reconstruction_from_noise_maps_is_exact(sd15_pipe, image):
    """The paper's sequential loop: reconstruction replays the inversion's float ops."""
    inv = sd15_pipe.invert(image, "a red circle", method="ddpm", steps=12, guidance_scale=3.5, seed=1,
                           exact=True, progress=False)
    assert inv.noise.shape == (12, 1, 4, 32, 32)
    x = editor("ddpm")(sd15_pipe, inv, None, progress=False)
    torch.testing.assert_close(x, inv.x0, atol=1e-6, rtol=0)


def test_batched_reconstruction_is_exact_up_to_float_rounding(sd15_pipe, image):
    """Batched evaluation sees the drawn x_t, a replay sees x_t up to rounding; the random
    tiny UNet under CFG 3.5 amplifies that 1e-7 to ~1e-4 over 12 steps (measured 1.06e-4)."""
    inv = sd15_pipe.invert(image, "a red circle", method="ddpm", steps=12, guidance_scale=3.5, seed=1, progress=False)
    x = editor("ddpm")(sd15_pipe, inv, None, progress=False)
    torch.testing.assert_close(x, inv.x0, atol=3e-4, rtol=0)
    inv1 = sd15_pipe.invert(image, "a red circle", method="ddpm", steps=12, guidance_scale=1.0, seed=1, progress=False)
    torch.testing.assert_close(editor("ddpm")(sd15_pipe, inv1, None, progress=False), inv1.x0, atol=1e-4, rtol=0)


def test_reconstruction_with_skip_is_exact_sdxl(sdxl_pipe, image):
    inv = sdxl_pipe.invert(image, "a cat", method="ddpm", steps=10, skip=0.3, seed=2, exact=True, progress=False)
    x = editor("ddpm")(sdxl_pipe, inv, None, progress=False)
    torch.testing.assert_close(x, inv.x0, atol=1e-6, rtol=0)


def test_batched_over_timesteps_equals_sequential(sd15_pipe, image):
    """All T model evaluations in few big calls == one call per step (the paper's loop)."""
    seq = sd15_pipe.invert(image, "a", method="ddpm", steps=9, seed=3, batch_size=1, progress=False)
    bat = sd15_pipe.invert(image, "a", method="ddpm", steps=9, seed=3, batch_size=9, progress=False)
    torch.testing.assert_close(bat.latents, seq.latents, atol=0, rtol=0)
    torch.testing.assert_close(bat.noise, seq.noise, atol=1e-4, rtol=1e-4)


def test_edit_changes_the_image_and_is_deterministic(sd15_pipe, image):
    inv = sd15_pipe.invert(image, "a red circle", method="ddpm", steps=6, seed=0, progress=False)
    a = sd15_pipe.edit(inv, "ddpm", "a blue circle", guidance_scale=10.0, output_type="pt", progress=False)
    b = sd15_pipe.edit(inv, "ddpm", "a blue circle", guidance_scale=10.0, output_type="pt", progress=False)
    rec = sd15_pipe.reconstruct(inv, output_type="pt", progress=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - rec).abs().max() > 1e-3


def test_bad_arguments(sd15_pipe, image):
    with pytest.raises(ValueError, match="skip"):
        sd15_pipe.invert(image, method="ddpm", steps=4, skip=1.0, progress=False)
    with pytest.raises(ValueError, match="unknown inversion method 'nope'"):
        sd15_pipe.invert(image, method="nope")
    inv = sd15_pipe.invert(image, method="ddim", steps=2, progress=False)
    with pytest.raises(ValueError, match="no noise maps"):
        sd15_pipe.edit(inv, "ddpm", "x", progress=False)
