"""ReNoise for SDXL-Turbo (Euler ancestral, noise correction) on a tiny SDXL-Turbo-shaped model."""

import pytest
import torch

import engine
from engine.editing.renoise_euler import correct_noise
from engine.runtime.graphs import GraphRunner
from engine.sampling import make_sampler
from engine.sampling.samplers import ancestral_sigmas

IMAGE = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PLAIN = dict(renoise_steps=0, lambda_ac=0.0, lambda_kl=0.0, average=False, noise_correction=False)


@pytest.fixture(scope="module")
def turbo(tiny_turbo_dir):
    return engine.load(tiny_turbo_dir)


def _inv(pipe, **kw):
    return pipe.invert(IMAGE, "a red circle", method="renoise", progress=False, **kw)


def test_one_iteration_without_corrections_is_plain_euler_ancestral_inversion(turbo):
    """The official inverse step, z_k = z_{k+1} - d(z_{k+1}; t_k) dt_k - n_k sigma_up_k, written out."""
    # the official Turbo configuration: 4 steps; 5 + 1 iterations at t=249, 9 + 1 and a correction above
    prog = turbo.program("invert", dict(image=IMAGE, prompt="a red circle", method="renoise"))
    assert prog.steps_left == 6 + 3 * (10 + 1) and len(prog.sampler) == 4
    inv = _inv(turbo, **PLAIN)
    assert inv.steps == 4 and inv.settings["sampler"] == "euler_ancestral"
    smp = make_sampler("euler_ancestral", turbo.schedule, 4)
    den = turbo.denoiser
    rows = den.condition(inv.source, 32, 32)
    z = inv.x0.float()
    for k in reversed(range(4)):
        s, s_next = smp.sigmas[k], smp.sigmas[k + 1]
        up, down = ancestral_sigmas(s, s_next)
        out = den(smp.scale_model_input(z, k), smp.timesteps[k].expand(1), rows).float()
        d = (z - (z - s * out)) / s  # the scheduler's derivative, (x - x0) / sigma, as diffusers computes it
        z = z - d * (down - s) - inv.noise[k] * up
        torch.testing.assert_close(inv.latents[k], z, rtol=1e-5, atol=1e-5)


def test_replay_uses_the_corrected_noise_and_batches_under_graphs(turbo):
    short = dict(renoise_steps=3, window=(2, 4), reg_steps=1)  # the official Turbo settings, shortened (test time)
    inv = _inv(turbo, **short)  # regularised, averaged, noise correction
    assert turbo.last_loop.calls == 4 * (3 + 1) + 3  # 3 corrections (the last step draws no noise)
    plain = _inv(turbo, noise_correction=False, **short)
    torch.testing.assert_close(inv.latents, plain.latents, rtol=0, atol=0)  # correction moves only noises
    moved = (inv.noise - plain.noise).flatten(1).norm(dim=1)  # [4]
    assert torch.all(moved[:3] > 0) and moved[3] == 0  # the last step has no noise (sigma_up 0)
    # the replay: Euler ancestral from latents[0] driven by the stored maps, written out
    smp = make_sampler("euler_ancestral", turbo.schedule, 4)
    rows = turbo.denoiser.condition(inv.source, 32, 32)
    x = inv.latents[0]
    for k in range(4):
        out = turbo.denoiser(smp.scale_model_input(x, k), smp.timesteps[k].expand(1), rows)
        x = smp.step(k, x, out, noise=inv.noise[k])[0]
    got = turbo.edit_many([dict(inv=inv, method="renoise")], output_type="pt")[0]
    torch.testing.assert_close(got, turbo.decode(x), rtol=0, atol=1e-5)
    # the 4 + 4 edit: a reconstruction and an edit in one call per step, eager and "fake"-captured
    reqs = [dict(inv=inv, method="renoise"), dict(inv=inv, method="renoise", target_prompt="a blue circle")]
    eager = turbo.edit_many(reqs, output_type="pt")
    assert turbo.last_loop.calls == 4
    graphed = turbo.edit_many(reqs, output_type="pt", cuda_graphs=GraphRunner(mode="fake"))
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert (eager[0] - eager[1]).abs().max() > 1e-3


def test_correct_noise_moves_by_the_rate_along_the_unit_direction(sd15_pipe):
    n, req = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)  # 16 apart per image (L2)
    one = correct_noise(n, req, steps=1)
    torch.testing.assert_close(one.flatten(1).norm(dim=1), torch.full((2,), 1.8))
    near = correct_noise(n, req, steps=10)  # 10 x 1.8 = 18 > 16: it reaches, then oscillates within 1.8
    assert float((near - req).flatten(1).norm(dim=1).max()) <= 1.8
    with pytest.raises(ValueError, match="noise_correction applies"):
        _inv(sd15_pipe, noise_correction=True)  # DDIM (the SD model's sampler) is deterministic
