"""Sampler steps against diffusers' schedulers over full trajectories (CPU, fake model)."""

import pytest
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from engine.sampling import NoiseSchedule, SamplerState, SchedulerConfig, make_sampler
from engine.step import sample

# diffusers' own numpy-2 DeprecationWarnings (np.array of a tensor) are noise here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (2, 4, 8, 8)
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
CONFIGS = {  # name -> diffusers config dict (SD-like unless noted)
    "sd15": {**SD, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False},
    "trailing": {**SD, "timestep_spacing": "trailing", "clip_sample": False},
    "linspace": {**SD, "timestep_spacing": "linspace", "set_alpha_to_one": False},
    "defaults": {},  # diffusers defaults: linear betas, clip_sample, set_alpha_to_one
    "cosine_leading": {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading", "steps_offset": 1},
    "zero_snr": {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False},
}
STEPS = [1, 4, 10, 50]
PREDS = ["epsilon", "v_prediction"]
TOL = dict(atol=1e-6, rtol=0)


def fake_model(x, t):
    """A fixed smooth function of x and t (t: [] or [B])."""
    tt = t.float().reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(x) * torch.cos(tt / 311.0) + 0.3 * torch.sin(0.7 * x + tt / 97.0)


def noises(n, shape=SHAPE, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def cases(names=CONFIGS, preds=PREDS, steps=STEPS):
    out = []
    for name in names:
        for pred in preds:
            if name == "zero_snr" and pred == "epsilon":
                continue  # alpha_bar_T = 0: x0 from epsilon is inf (in diffusers too)
            out += [(name, pred, n) for n in steps]
    return out


def run_diffusers(sched, x, n, step_kw=lambda i: {}, **set_kw):
    sched.set_timesteps(n, **set_kw)
    xs = []
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x  # flow: none
        out = fake_model(x_in, t)
        x = sched.step(out, t, x, **step_kw(i)).prev_sample
        xs.append(x)
    return sched, xs


def run_ours(sampler, x, noise=None, generator=None):
    xs = []
    noise_fn = (lambda i, out: noise[i]) if noise is not None else None
    sample(fake_model, x, sampler, noise_fn=noise_fn, generator=generator, progress=False,
           callback=lambda d: xs.append(d["x"]))
    return xs


def check(sampler, ref, xs, ref_xs):
    assert torch.equal(sampler.timesteps, ref.timesteps)
    assert len(xs) == len(ref_xs)
    for i, (a, b) in enumerate(zip(xs, ref_xs)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"step {i}: {m}")


def setup(name, pred, **extra):
    d = {**CONFIGS[name], "prediction_type": pred, **extra}
    return d, NoiseSchedule(SchedulerConfig.from_dict(d))


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("name,pred,n", cases())
def test_ddim(name, pred, n, eta):
    d, sched = setup(name, pred)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    nz = noises(n)
    kw = (lambda i: {"eta": eta, "variance_noise": nz[i]}) if eta > 0 else (lambda i: {})
    ref, ref_xs = run_diffusers(DDIMScheduler.from_config(d), x, n, kw)
    s = make_sampler("ddim", sched, n, eta=eta)
    check(s, ref, run_ours(s, x, nz), ref_xs)


@pytest.mark.parametrize("name,pred,n", cases(["sd15", "trailing", "defaults", "zero_snr"]))
def test_ddim_inverse(name, pred, n):
    d, sched = setup(name, pred)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    ref, ref_xs = run_diffusers(DDIMInverseScheduler.from_config(d), x, n)
    s = make_sampler("ddim_inverse", sched, n)
    check(s, ref, run_ours(s, x), ref_xs)


@pytest.mark.parametrize("name,pred,n", cases(preds=PREDS + ["sample"]))
def test_ddpm_same_generator(name, pred, n):
    d, sched = setup(name, pred)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    ref, ref_xs = run_diffusers(DDPMScheduler.from_config(d), x, n, lambda i: {"generator": g})
    s = make_sampler("ddpm", sched, n)
    check(s, ref, run_ours(s, x, generator=torch.Generator().manual_seed(7)), ref_xs)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("name,pred,n", cases(["sd15", "trailing", "linspace", "zero_snr"], steps=[1, 2, 4, 10, 50]))
def test_dpmsolver(name, pred, n, algo, final):
    d, sched = setup(name, pred, algorithm_type=algo, solver_order=2, final_sigmas_type=final)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    nz = noises(n)
    kw = (lambda i: {"variance_noise": nz[i]}) if algo.startswith("sde") else (lambda i: {})
    ref, ref_xs = run_diffusers(DPMSolverMultistepScheduler.from_config(d), x, n, kw)
    s = make_sampler("dpmpp_2m_sde" if algo.startswith("sde") else "dpmpp_2m", sched, n)
    check(s, ref, run_ours(s, x, nz), ref_xs)


@pytest.mark.parametrize("opts", [{"solver_type": "heun"}, {"solver_order": 1}, {"lower_order_final": False},
                                  {"euler_at_final": True}, {"lambda_min_clipped": -5.1}])
@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpmsolver_options(opts, algo):
    d, sched = setup("sd15", "epsilon", algorithm_type=algo, final_sigmas_type="sigma_min", **opts)
    n = 12
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    ref, ref_xs = run_diffusers(DPMSolverMultistepScheduler.from_config(d), x, n, lambda i: {"generator": g})
    s = make_sampler("dpmsolver", sched, n)
    check(s, ref, run_ours(s, x, generator=torch.Generator().manual_seed(3)), ref_xs)


@pytest.mark.parametrize("name,pred,n", cases(preds=PREDS + ["sample"]))
def test_euler(name, pred, n):
    d, sched = setup(name, pred)
    s = make_sampler("euler", sched, n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref = EulerDiscreteScheduler.from_config(d)
    ref.set_timesteps(n)
    assert s.init_noise_sigma == float(ref.init_noise_sigma)
    x = x * s.init_noise_sigma
    ref, ref_xs = run_diffusers(ref, x, n)
    xs = run_ours(s, x)
    scale = max(1.0, s.init_noise_sigma)  # x lives at sigma scale (up to 4096 with zero SNR)
    check(s, ref, [a / scale for a in xs], [b / scale for b in ref_xs])


@pytest.mark.parametrize("name,pred,n", cases(names=["sd15", "trailing", "linspace"], steps=[1, 4, 10]))
def test_euler_ancestral_same_generator(name, pred, n):
    """SDXL-Turbo's scheduler (trailing spacing there): noise drawn at every step from one generator."""
    d, sched = setup(name, pred)
    s = make_sampler("euler_ancestral", sched, n)
    ref = EulerAncestralDiscreteScheduler.from_config(d)
    ref.set_timesteps(n)
    assert s.init_noise_sigma == float(ref.init_noise_sigma)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
    g = torch.Generator().manual_seed(7)
    ref, ref_xs = run_diffusers(ref, x, n, lambda i: {"generator": g})
    xs = run_ours(s, x, generator=torch.Generator().manual_seed(7))
    scale = max(1.0, s.init_noise_sigma)
    check(s, ref, [a / scale for a in xs], [b / scale for b in ref_xs])


@pytest.mark.parametrize("cfg,mu", [({"shift": 1.0}, None), ({"shift": 3.0}, None),
                                    ({"use_dynamic_shifting": True, "shift": 3.0}, 0.95)])
@pytest.mark.parametrize("n", STEPS)
def test_flow_euler(cfg, mu, n):
    sched = NoiseSchedule(SchedulerConfig.from_dict(cfg))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref, ref_xs = run_diffusers(FlowMatchEulerDiscreteScheduler.from_config(cfg), x, n, mu=mu)
    s = make_sampler("flow_euler", sched, n, mu=mu)
    check(s, ref, run_ours(s, x), ref_xs)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_generator_draw_order(eta):
    d, sched = setup("sd15", "epsilon")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(11)
    ref, ref_xs = run_diffusers(DDIMScheduler.from_config(d), x, 10, lambda i: {"eta": eta, "generator": g})
    s = make_sampler("ddim", sched, 10, eta=eta)
    check(s, ref, run_ours(s, x, generator=torch.Generator().manual_seed(11)), ref_xs)


def test_generator_list_draws_per_row():
    d, sched = setup("sd15", "epsilon")
    s = make_sampler("dpmpp_2m_sde", sched, 5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    both = sample(fake_model, x, s, generator=[torch.Generator().manual_seed(k) for k in (1, 2)], progress=False)
    for r, k in enumerate((1, 2)):
        one = sample(fake_model, x[r : r + 1], s, generator=torch.Generator().manual_seed(k), progress=False)
        torch.testing.assert_close(both[r : r + 1], one, **TOL)


MIXED = {
    "ddim": ({}, dict(eta=0.5)),
    "ddim_inverse": ({}, {}),
    "ddpm": ({}, {}),
    "dpmpp_2m": ({"final_sigmas_type": "sigma_min"}, {}),
    "dpmpp_2m_sde": ({}, {}),
    "euler": ({"timestep_spacing": "trailing"}, {}),
    "flow_euler": ({"shift": 3.0}, {}),
}


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("name", list(MIXED))
def test_rows_at_different_steps(name, pred):
    """One batched step with rows at different step indices == each row stepped alone."""
    extra, opts = MIXED[name]
    sched = NoiseSchedule(SchedulerConfig.from_dict({**CONFIGS["sd15"], "prediction_type": pred, **extra}))
    s = make_sampler(name, sched, 8, **opts)
    n = len(s)
    nz = noises(n, shape=(1, *SHAPE[1:]), seed=5)
    # Per-row trajectories, recording the inputs (x, state) of every step.
    x = torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
    st = s.init_state(x)
    traj = []
    for i in range(n):
        out = fake_model(s.scale_model_input(x, i), s.timesteps[i].expand(1))
        x_next, st_next = s.step(i, x, out, st, nz[i] if s.needs_noise(i) else None)
        traj.append((x, st, out, nz[i], x_next, st_next))
        x, st = x_next, st_next
    for pair in [(0, 3), (1, 2), (5, n - 1), (n - 1, 0), (4, 4)]:
        idx = torch.tensor(pair)  # [B] per-row step index
        xb = torch.cat([traj[i][0] for i in pair])
        sb = SamplerState.cat([traj[i][1] for i in pair])
        xin = s.scale_model_input(xb, idx)
        torch.testing.assert_close(xin, torch.cat([s.scale_model_input(traj[i][0], i) for i in pair]), **TOL)
        out = fake_model(xin, s.timesteps[idx])
        noise = torch.cat([traj[i][3] for i in pair]) if any(s.needs_noise(i) for i in pair) else None
        xb_next, sb_next = s.step(idx, xb, out, sb, noise)
        for r, i in enumerate(pair):
            torch.testing.assert_close(xb_next[r : r + 1], traj[i][4], **TOL)
            torch.testing.assert_close(sb_next.x0[r : r + 1], traj[i][5].x0, **TOL)


def test_callback_and_progress(capsys):
    d, sched = setup("sd15", "epsilon")
    s = make_sampler("DDIMScheduler", sched, 3)
    seen = []
    x = torch.randn(SHAPE)
    sample(fake_model, x, s, callback=seen.append, progress=False)
    assert [c["i"] for c in seen] == [0, 1, 2] and seen[0]["t"].shape == (2,)
    assert set(seen[0]) == {"i", "t", "x", "x0"}
    assert "it/s" not in capsys.readouterr().err
    sample(fake_model, x, s, progress=True)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(MIXED))
def test_step_has_no_host_sync(name):
    """On the meta device any .item() / bool(tensor) in a step raises: steps stay graph-capturable."""
    extra, opts = MIXED[name]
    sched = NoiseSchedule(SchedulerConfig.from_dict({**CONFIGS["sd15"], **extra}))
    s = make_sampler(name, sched, 8, **opts).to("meta")
    x = torch.empty(SHAPE, device="meta")
    i = torch.empty(SHAPE[0], dtype=torch.long, device="meta")  # [B] per-row step index
    state = s.init_state(x)
    for _ in range(2):
        xin = s.scale_model_input(x, i)
        x, state = s.step(i, x, torch.empty_like(xin), state, torch.empty_like(xin))
    assert x.shape == SHAPE and x.device.type == "meta"
