"""Diffusion samplers as batched standalone functions with a per-row step index.

Usage (what a pipeline does)::

    sched = NoiseSchedule(SchedulerConfig.from_file(model_dir))
    sampler = make_sampler("ddim", sched, steps, eta=0.0)
    x = noise * sampler.init_noise_sigma
    x = engine.step.sample(lambda x_in, t: unet(x_in, t, ...), x, sampler, generator=g)  # the one loop

Schedule (`schedule`):
    SchedulerConfig.from_dict(d) / .from_file(path)  -- diffusers scheduler_config.json
    NoiseSchedule(config)  -- betas, alphas_cumprod, final_alpha_cumprod, timestep grids, sigmas
    flow_sigmas(config, num_steps, mu=None, base=None), flow_shift_mu(image_seq_len, config),
    flux_base_sigmas(num_steps)

Front (`front`):
    make_sampler(name, schedule, num_steps, *, eta=0.0, use_clipped_model_output=False,
                 mu=None, sigmas=None, device=None, **config_overrides) -> Sampler
        names: ddim, ddim_inverse, ddpm, dpmpp_2m, dpmpp_2m_sde, dpmsolver, euler, flow_euler
        (or the diffusers class name, e.g. "DDIMScheduler")
    Sampler: .timesteps [S], .init_noise_sigma, .scale_model_input(x, i),
             .init_state(x), .step(i, x, model_output, state=None, noise=None) -> (x_next, state),
             .needs_noise(i), .noise_dtype, .to(device), len(sampler)
        i is an int or a [B] int64 tensor of per-row step indices; state.x0 is the step's
        x0 prediction. No host syncs inside step (CUDA-graph capturable with tensor i).
    (the loop that drives a sampler is engine.step: run(programs, denoiser), or
     sample(model_fn, x, sampler, *, generator=None, noise_fn=None, callback=None,
            progress=True, start=0, state=None) -> x for an opaque model function)
    randn(shape, generator=None, device=None, dtype=None)  -- diffusers' randn_tensor draw order

Step math (`samplers`, `dpmsolver`), per-row schedule values as [B] tensors:
    ddim_step, ddpm_step, euler_step, flow_euler_step, dpmpp_2m_step (+ DPMState, init_dpm_state)
"""

from .dpmsolver import DPMSolverSampler, DPMState, dpmpp_2m_step, init_dpm_state
from .front import SAMPLERS, make_sampler, randn, sampler_name_for
from .samplers import (
    DDIMSampler,
    DDPMSampler,
    EulerSampler,
    FlowEulerSampler,
    Sampler,
    SamplerState,
    ddim_step,
    ddpm_step,
    euler_step,
    flow_euler_step,
)
from .schedule import NoiseSchedule, SchedulerConfig, UnsupportedConfigError, flow_shift_mu, flow_sigmas, flux_base_sigmas

__all__ = [
    "SchedulerConfig", "NoiseSchedule", "UnsupportedConfigError", "flow_sigmas", "flow_shift_mu", "flux_base_sigmas",
    "make_sampler", "randn", "sampler_name_for", "SAMPLERS",
    "Sampler", "SamplerState", "DDIMSampler", "DDPMSampler", "EulerSampler", "FlowEulerSampler",
    "DPMSolverSampler", "DPMState", "init_dpm_state",
    "ddim_step", "ddpm_step", "euler_step", "flow_euler_step", "dpmpp_2m_step",
]
