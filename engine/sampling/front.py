"""The uniform front: `make_sampler` builds a sampler's per-step tables from a `NoiseSchedule`
exactly as the matching diffusers scheduler's ``set_timesteps`` would; `randn` draws noise
as diffusers does. The loop that drives a sampler is the one loop, `engine.step.run`
(`engine.step.sample` for an opaque model function)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dpmsolver import DPMSolverSampler
from .samplers import DDIMSampler, DDPMSampler, EulerAncestralSampler, EulerSampler, FlowEulerSampler, Sampler
from .schedule import NoiseSchedule, SchedulerConfig, UnsupportedConfigError, flow_sigmas

# Sampler names, and the diffusers scheduler class each reproduces.
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "ddim_inverse": "DDIMInverseScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",  # algorithm_type="dpmsolver++"
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",  # algorithm_type="sde-dpmsolver++"
    "dpmsolver": "DPMSolverMultistepScheduler",  # algorithm_type from the config
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
_BY_CLASS = {"DDIMScheduler": "ddim", "DDIMInverseScheduler": "ddim_inverse", "DDPMScheduler": "ddpm",
             "DPMSolverMultistepScheduler": "dpmsolver", "EulerDiscreteScheduler": "euler",
             "EulerAncestralDiscreteScheduler": "euler_ancestral", "FlowMatchEulerDiscreteScheduler": "flow_euler"}


def sampler_name_for(config: SchedulerConfig) -> str:
    """The sampler reproducing the config's own scheduler class (``_class_name``)."""
    if config.class_name not in _BY_CLASS:
        raise UnsupportedConfigError(f"scheduler config: no sampler for _class_name={config.class_name!r}")
    return _BY_CLASS[config.class_name]


def _clip_range(cfg: SchedulerConfig) -> float | None:
    clip = True if cfg.clip_sample is None else cfg.clip_sample  # DDIM/DDPM default to clipping
    return cfg.clip_sample_range if clip else None


def make_sampler(
    name: str,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    mu: float | None = None,
    sigmas=None,
    device: torch.device | str | None = None,
    **config_overrides: Any,
) -> Sampler:
    """Build sampler ``name`` (see `SAMPLERS`) for ``num_steps`` inference steps.

    eta, use_clipped_model_output: DDIM only. mu: flow matching with dynamic shifting; sigmas: its
    unshifted grid given (as ``set_timesteps(sigmas=...)``; FLUX pipelines do).
    config_overrides: SchedulerConfig fields to change for this sampler (e.g.
    ``timestep_spacing="trailing"``, ``solver_order=1``), like diffusers'
    ``X.from_config(config, **overrides)``.
    """
    if name in _BY_CLASS:
        name = _BY_CLASS[name]
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    if name != "ddim" and (eta != 0.0 or use_clipped_model_output):
        raise ValueError("eta / use_clipped_model_output apply to the 'ddim' sampler only")
    if sigmas is not None and name != "flow_euler":
        raise ValueError("sigmas apply to the 'flow_euler' sampler only")
    kind = name
    if name in ("dpmpp_2m", "dpmpp_2m_sde"):
        config_overrides.setdefault("algorithm_type", "dpmsolver++" if name == "dpmpp_2m" else "sde-dpmsolver++")
        kind = "dpmsolver"
    if config_overrides:
        schedule = NoiseSchedule(schedule.config.replace(**config_overrides))
    cfg, T = schedule.config, schedule.num_train_timesteps
    ac = schedule.alphas_cumprod  # [T]
    pred = cfg.prediction_type

    if kind == "ddim":
        ts = schedule.timesteps(num_steps)  # [S]
        prev = ts - T // num_steps  # diffusers' rule for every spacing
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], schedule.final_alpha_cumprod)  # [S]
        s = DDIMSampler(name, ts, pred, 1.0, alpha_t=ac[ts], alpha_prev=a_prev, eta=float(eta),
                        clip_range=_clip_range(cfg), use_clipped_model_output=use_clipped_model_output)
        if eta > 0:
            s.noise_steps = (True,) * len(ts)
    elif kind == "ddim_inverse":
        ts = schedule.inverse_timesteps(num_steps)  # [S] ascending: the level each step lands on
        src = (ts - T // num_steps).clamp(max=T - 1)  # [S] the level each step starts from
        a_src = torch.where(src >= 0, ac[src.clamp(min=0)], schedule.final_alpha_cumprod)  # [S]
        s = DDIMSampler(name, ts, pred, 1.0, alpha_t=a_src, alpha_prev=ac[ts], clip_range=_clip_range(cfg))
    elif kind == "ddpm":
        if cfg.variance_type not in (None, "fixed_small"):
            raise UnsupportedConfigError(f"scheduler config: variance_type={cfg.variance_type!r} is unsupported for DDPM")
        ts = schedule.timesteps(num_steps)  # [S]
        prev = torch.cat([ts[1:], ts.new_full((1,), -1)])  # [S]
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.tensor(1.0))  # [S]
        s = DDPMSampler(name, ts, pred, 1.0, alpha_t=ac[ts], alpha_prev=a_prev, clip_range=_clip_range(cfg))
        s.noise_steps = tuple(bool(t > 0) for t in ts)
    elif kind == "dpmsolver":
        ts = schedule.dpm_timesteps(num_steps)  # [S]
        sigmas = schedule.sigmas_at(ts)  # [S+1]
        n = len(ts)
        final_first = cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        sde = cfg.algorithm_type == "sde-dpmsolver++"
        s = DPMSolverSampler(name, ts, pred, 1.0, sigmas=sigmas, sde=sde, solver_type=cfg.solver_type,
                             solver_order=cfg.solver_order, final_first_order=final_first)
        if sde:
            s.noise_steps, s.noise_dtype = (True,) * n, torch.float32  # diffusers draws float32 noise
    elif kind in ("euler", "euler_ancestral"):
        ts = schedule.euler_timesteps(num_steps)  # [S] float32
        sigmas = schedule.sigmas_at(ts, final_zero=kind == "euler_ancestral")  # [S+1]
        top = sigmas.max()
        init = top if schedule.spacing("linspace") in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        cls = EulerSampler if kind == "euler" else EulerAncestralSampler
        s = cls(name, ts, pred, float(init), sigmas=sigmas)
        if kind == "euler_ancestral":
            s.noise_steps = (True,) * len(ts)
    else:
        assert kind == "flow_euler"
        sigmas = flow_sigmas(cfg, num_steps, mu, sigmas)  # [S+1]
        s = FlowEulerSampler(name, sigmas[:-1] * T, "flow", 1.0, sigmas=sigmas)
    return s.to(device) if device is not None else s


def randn(shape, generator=None, device=None, dtype=None) -> Tensor:
    """Gaussian noise drawn like diffusers' ``randn_tensor``: on the generator's device (CPU
    generators for CUDA targets), one draw per row when given a list of generators."""
    device = torch.device(device or "cpu")
    gens = generator if isinstance(generator, list) else None
    if gens is not None and len(gens) == 1:
        generator, gens = gens[0], None
    gen_dev = (gens[0] if gens else generator).device if (gens or generator is not None) else device
    if gen_dev.type != device.type and gen_dev.type != "cpu":
        raise ValueError(f"cannot draw noise for {device.type} with a {gen_dev.type} generator")
    draw_dev = gen_dev if gen_dev.type != device.type else device
    if gens:
        row = (1, *shape[1:])
        return torch.cat([torch.randn(row, generator=g, device=draw_dev, dtype=dtype) for g in gens]).to(device)
    return torch.randn(shape, generator=generator, device=draw_dev, dtype=dtype).to(device)
