"""Flow inversion and RF-Inversion (Rout et al. 2024) on tiny FLUX models, by their defining properties."""

import pytest
import torch

from engine.editing import Inversion
from engine.editing.flow import eta_schedule

IMAGE = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # [1, 3, H, W] in [0, 1]
STEPS = 4


def _invert(pipe, method="rf-inversion", **kw):
    return pipe.invert(IMAGE, "a red circle", method=method, steps=STEPS, progress=False, **kw)


def test_gamma_zero_is_plain_flow_inversion(flux_pipe):
    flow = _invert(flux_pipe, "flow")
    rf = _invert(flux_pipe, gamma=0.0)
    torch.testing.assert_close(rf.latents, flow.latents, rtol=0, atol=0)
    assert flow.latents.shape == (STEPS + 1, 1, 16, 8, 8)
    torch.testing.assert_close(flow.latents[-1], flow.x0, rtol=0, atol=0)  # latents[S] is the image


def test_gamma_one_lands_on_the_anchor(flux_pipe):
    """With gamma = 1 the velocity is the straight path to y_1, reached exactly at sigma = 1."""
    inv = _invert(flux_pipe, gamma=1.0, seed=5)
    y1 = torch.randn(inv.x0.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(inv.latents[0], y1, rtol=1e-5, atol=1e-5)


def test_eta_zero_is_plain_generation_from_the_inverted_noise(flux_pipe):
    inv = _invert(flux_pipe)
    got = flux_pipe.edit(inv, "rf-inversion", "a blue square", eta=0.0, output_type="pt", progress=False)
    plain = flux_pipe.generate("a blue square", latents=inv.latents[0], steps=STEPS, height=16, width=16,
                               embedded_guidance=3.5 if flux_pipe.transformer.config.guidance_embeds else None,
                               output_type="pt", progress=False)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    flow = flux_pipe.edit(inv, "flow", "a blue square", output_type="pt", progress=False)
    torch.testing.assert_close(flow, plain, rtol=0, atol=0)


def test_eta_one_throughout_returns_to_the_image(flux_pipe):
    """eta = 1 on every step follows the straight path to y_0 = the image latents, reached at sigma = 0."""
    inv = _invert(flux_pipe)
    prog = flux_pipe.program("edit", dict(inv=inv, method="rf-inversion", target_prompt="a blue square", eta=1.0,
                                          start=0.0, stop=1.0))
    from engine.step import run

    x = run([prog], flux_pipe.denoiser)[0]
    torch.testing.assert_close(x, inv.x0.float(), rtol=1e-5, atol=1e-5)


def test_controller_steers_the_edit_and_reconstruction_is_close(flux_pipe):
    inv = _invert(flux_pipe)
    free = flux_pipe.edit(inv, "rf-inversion", "a blue square", eta=0.0, output_type="pt", progress=False)
    steered = flux_pipe.edit(inv, "rf-inversion", "a blue square", eta=0.9, stop=0.5, output_type="pt", progress=False)
    target = flux_pipe.decode(inv.x0)
    assert (steered - target).abs().mean() < (free - target).abs().mean()  # pulled toward the image


def test_eta_schedule():
    assert eta_schedule(28, 0.9, 0.0, 0.25) == [0.9] * 7 + [0.0] * 21  # int(0.25 * 28) = 7, as the reference
    decayed = eta_schedule(4, 1.0, 0.0, 1.0, decay_eta=True, eta_decay_power=2.0)
    assert decayed == [1.0, 0.75 ** 2, 0.5 ** 2, 0.25 ** 2]
    with pytest.raises(ValueError, match="start <= stop"):
        eta_schedule(4, 1.0, 0.5, 0.25)


def test_requests_batch_and_inversions_save(flux_pipe, tmp_path):
    """An RF-Inversion edit, a flow edit and a generation share each step's call and each equals
    the request alone; an inversion saved and loaded edits the same."""
    inv = _invert(flux_pipe)
    inv.save(tmp_path / "inv.safetensors")
    back = Inversion.load(tmp_path / "inv.safetensors")
    reqs = [dict(inv=inv, method="rf-inversion", target_prompt="a blue square"),
            dict(inv=back, method="flow", target_prompt="a green circle"),
            dict(prompt="a circle", steps=STEPS, seed=1, height=16, width=16)]
    together = flux_pipe.edit_many(reqs, output_type="pt")
    assert flux_pipe.last_loop.calls == STEPS
    for req, got in zip(reqs, together):
        torch.testing.assert_close(got, flux_pipe.edit_many([req], output_type="pt")[0], rtol=1e-5, atol=1e-5)


def test_errors(flux_pipe, sd15_pipe):
    with pytest.raises(ValueError, match="gamma must be in"):  # engine.params: a fraction
        _invert(flux_pipe, gamma=2.0)
    with pytest.raises(ValueError, match="runs on FLUX models"):
        sd15_pipe.invert(IMAGE, "x", method="rf-inversion", steps=2)
    inv = _invert(flux_pipe)
    with pytest.raises(ValueError, match="eta must be"):
        flux_pipe.edit(inv, "rf-inversion", "x", eta=-1.0)
    with pytest.raises(ValueError, match="has no controller"):
        flux_pipe.edit(inv, "flow", "x", eta=0.5)
