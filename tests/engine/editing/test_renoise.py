"""ReNoise inversion (Garibi et al. 2024) on tiny SD models, by its defining properties."""

import pytest
import torch

from engine.editing.renoise import patch_kl
from engine.sampling import make_sampler
from engine.sampling.samplers import ddim_step, pred_x0_eps

IMAGE = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
STEPS = 5
PLAIN = dict(lambda_ac=0.0, lambda_kl=0.0)  # no regularisation


def _inv(pipe, **kw):
    return pipe.invert(IMAGE, "a red circle", method="renoise", steps=STEPS, progress=False, **kw)


def test_no_renoising_and_no_regularisation_is_ddim_inversion(sd15_pipe):
    ddim = sd15_pipe.invert(IMAGE, "a red circle", method="ddim", steps=STEPS, progress=False)
    rn = _inv(sd15_pipe, renoise_steps=0, **PLAIN)
    torch.testing.assert_close(rn.latents, ddim.latents, rtol=0, atol=0)
    assert rn.method == "renoise" and rn.settings["renoise_steps"] == 0


def _residuals(pipe, inv):
    """Per step: |inv_step(z_{t-1}, eps(z_t, t)) - z_t|: how far z_t is from a fixed point."""
    smp = make_sampler("ddim_inverse", pipe.schedule, STEPS)
    den = pipe.denoiser
    rows = den.condition(inv.source, 32, 32)
    lat = inv.latents.flip(0)  # [S+1, ...] from the image up
    out = []
    for i in range(STEPS):
        z_prev, z = lat[i], lat[i + 1]
        pred = den(z, smp.timesteps[i].expand(1), rows).float()
        eps = pred_x0_eps(z, pred, smp.alpha_prev[i], smp.prediction_type)[1]
        nxt = ddim_step(z_prev, eps, smp.alpha_t[i], smp.alpha_prev[i], prediction_type="epsilon")[0]
        out.append((nxt - z).abs().mean().item())
    return out


def test_renoising_moves_steps_toward_their_fixed_points(sd15_pipe):
    """Renoising solves each step's implicit equation: at the least noisy step (where the fixed-point
    map contracts even for a random tiny UNet) the residual all but vanishes; overall it falls."""
    plain = _residuals(sd15_pipe, _inv(sd15_pipe, renoise_steps=0, **PLAIN))
    iterated = _residuals(sd15_pipe, _inv(sd15_pipe, renoise_steps=6, max_first=6, average=False, **PLAIN))
    assert iterated[0] < 0.01 * plain[0] and sum(iterated) < sum(plain), (plain, iterated)


def test_defaults_run_edit_and_batch(sd15_pipe):
    inv = _inv(sd15_pipe)  # the official defaults: regularised, averaged windows
    assert torch.isfinite(inv.latents).all() and inv.latents.shape[0] == STEPS + 1
    assert not torch.equal(inv.latents, _inv(sd15_pipe, **PLAIN).latents)  # the regularisation acts
    edit = dict(inv=inv, method="renoise", target_prompt="a blue circle", guidance_scale=2.0)
    gen = dict(prompt="a circle", steps=3, seed=0)
    together = sd15_pipe.edit_many([edit, gen], output_type="pt")
    for req, got in zip((edit, gen), together):
        torch.testing.assert_close(got, sd15_pipe.edit_many([req], output_type="pt")[0], rtol=1e-5, atol=1e-5)
    # its iterations batch with another inversion's steps; fixed-shape calls make that bit-identical
    # (the regularisation's gradient steps amplify a GEMM's batch-size rounding otherwise)
    req = dict(image=IMAGE, prompt="a red circle", method="renoise", steps=STEPS)
    alone = sd15_pipe.invert_many([req], batch_invariant=True, bucket_rows=4)[0]
    both = sd15_pipe.invert_many([req, dict(image=IMAGE, prompt="a red circle", method="ddim", steps=STEPS)],
                                 batch_invariant=True, bucket_rows=4)
    torch.testing.assert_close(both[0].latents, alone.latents, rtol=0, atol=0)


def test_patch_kl_and_errors(sd15_pipe):
    x = torch.randn(2, 4, 8, 8)
    assert torch.all(patch_kl(x, x) < 1e-4)
    assert torch.all(patch_kl(x * 3 + 1, x) > 1.0)
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        _inv(sd15_pipe, guidance_scale=7.5)
    with pytest.raises(ValueError, match="window must be"):
        _inv(sd15_pipe, window=(5, 2))
