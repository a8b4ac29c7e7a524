"""NoiseSchedule / SchedulerConfig against diffusers' schedulers (CPU, fast)."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from engine.sampling import NoiseSchedule, SchedulerConfig, UnsupportedConfigError, make_sampler

# diffusers' own numpy-2 DeprecationWarnings (np.array of a tensor) are noise here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDM)
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SCHEDULES = [
    {},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
    {"trained_betas": np.linspace(0.001, 0.03, 1000).tolist()},
    {"num_train_timesteps": 500, "set_alpha_to_one": False},
]


@pytest.mark.parametrize("cfg", SCHEDULES)
def test_schedule_bitwise(cfg):
    ours = NoiseSchedule(SchedulerConfig.from_dict(cfg))
    ref = DDIMScheduler.from_config(cfg)
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)
    euler = EulerDiscreteScheduler.from_config(cfg)
    assert torch.equal(ours.sigmas().flip(0), euler.sigmas[:-1])


STEPS = [1, 2, 4, 7, 10, 25, 50, 999]
VARIANTS = [
    {},
    {"steps_offset": 1},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace"},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_timesteps_match_set_timesteps(variant):
    cfg = {**SD15, **variant}
    sched = NoiseSchedule(SchedulerConfig.from_dict(cfg))
    for n in STEPS:
        for name, cls in [("ddim", DDIMScheduler), ("ddpm", DDPMScheduler), ("euler", EulerDiscreteScheduler)]:
            ref = cls.from_config(cfg)
            ref.set_timesteps(n)
            s = make_sampler(name, sched, n)
            assert s.timesteps.dtype == ref.timesteps.dtype and torch.equal(s.timesteps, ref.timesteps), (name, n)
            if name == "euler":
                assert torch.equal(s.sigmas, ref.sigmas), n
                assert s.init_noise_sigma == float(ref.init_noise_sigma)
        ref = DPMSolverMultistepScheduler.from_config(cfg)
        ref.set_timesteps(n)
        if ref.timesteps.max() >= 1000:  # leading + steps_offset past T: we refuse, see below
            with pytest.raises(ValueError, match="num_train_timesteps|training timesteps; use fewer steps"):
                make_sampler("dpmpp_2m", sched, n)
        else:
            s = make_sampler("dpmpp_2m", sched, n)
            assert torch.equal(s.timesteps, ref.timesteps), ("dpm", n)
            assert torch.equal(s.sigmas, ref.sigmas), ("dpm", n)
        if variant.get("timestep_spacing", "leading") != "linspace":
            ref = DDIMInverseScheduler.from_config(cfg)
            ref.set_timesteps(n)
            assert torch.equal(make_sampler("ddim_inverse", sched, n).timesteps, ref.timesteps), ("inverse", n)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_final_sigmas_type(final):
    cfg = {**SD15, "final_sigmas_type": final}
    sched = NoiseSchedule(SchedulerConfig.from_dict(cfg))
    for cls, name in [(DPMSolverMultistepScheduler, "dpmpp_2m"), (EulerDiscreteScheduler, "euler")]:
        ref = cls.from_config(cfg)
        ref.set_timesteps(20)
        assert torch.equal(make_sampler(name, sched, 20).sigmas, ref.sigmas)


@pytest.mark.parametrize(
    "cfg,mu",
    [({"shift": 1.0}, None), ({"shift": 3.0}, None), ({"shift": 3.0, "shift_terminal": 0.02}, None),
     ({"use_dynamic_shifting": True, "shift": 3.0}, 0.8),
     ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.3)],
)
def test_flow_sigmas(cfg, mu):
    sched = NoiseSchedule(SchedulerConfig.from_dict(cfg))
    for n in [1, 4, 28, 50] if "shift_terminal" not in cfg else [4, 28]:  # 1 step: NaN in diffusers too
        ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        ref.set_timesteps(n, mu=mu)
        s = make_sampler("flow_euler", sched, n, mu=mu)
        assert torch.equal(s.sigmas, ref.sigmas) and torch.equal(s.timesteps, ref.timesteps)


def test_from_file_and_defaults(tmp_path):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(SD15))
    cfg = SchedulerConfig.from_file(tmp_path)
    assert cfg == SchedulerConfig.from_file(folder / "scheduler_config.json")
    assert cfg.class_name == "PNDMScheduler" and cfg.steps_offset == 1 and cfg.clip_sample is False
    assert cfg.timestep_spacing is None  # each sampler applies its diffusers default
    sched = NoiseSchedule(cfg)
    assert make_sampler("ddim", sched, 4).timesteps.tolist() == [751, 501, 251, 1]  # leading
    assert make_sampler("dpmpp_2m", sched, 4).timesteps.tolist() == [999, 749, 500, 250]  # linspace


@pytest.mark.parametrize(
    "d,field",
    [
        ({"thresholding": True}, "thresholding"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"solver_order": 3}, "solver_order"),
        ({"algorithm_type": "dpmsolver"}, "algorithm_type"),
        ({"variance_type": "learned_range"}, "variance_type"),
        ({"original_inference_steps": 50}, "original_inference_steps"),
        ({"interpolation_type": "log_linear"}, "interpolation_type"),
    ],
)
def test_unsupported_config_errors(d, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        SchedulerConfig.from_dict({**SD15, **d})


def test_unsupported_sampler_combinations():
    sched = NoiseSchedule(SchedulerConfig.from_dict({**SD15, "timestep_spacing": "linspace"}))
    with pytest.raises(UnsupportedConfigError, match="linspace"):
        make_sampler("ddim_inverse", sched, 10)
    with pytest.raises(ValueError, match="num_steps"):
        make_sampler("ddim", sched, 1001)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("heun", sched, 10)
    with pytest.raises(ValueError, match="mu"):
        make_sampler("flow_euler", NoiseSchedule(SchedulerConfig(use_dynamic_shifting=True)), 10)
    assert math.isinf(SchedulerConfig.from_dict({"lambda_min_clipped": None}).lambda_min_clipped)
