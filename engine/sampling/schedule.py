"""Noise schedules and the timestep / sigma grids of diffusers' schedulers.

`SchedulerConfig` mirrors the keys of a diffusers ``scheduler_config.json``;
`NoiseSchedule` holds the training schedule (betas, cumulative alphas) and builds
the inference grids each sampler uses. All arithmetic follows diffusers' order and
dtypes (float32 torch for the schedule, numpy for the grids) so that the values
agree bit-for-bit with ``DDIMScheduler``, ``DPMSolverMultistepScheduler`` etc.

References: DDPM (Ho et al. 2020) for the beta schedules, improved DDPM
(Nichol & Dhariwal 2021) for ``squaredcos_cap_v2``, Lin et al. 2024 ("Common
Diffusion Noise Schedules and Sample Steps are Flawed") for zero terminal SNR
and the ``leading`` / ``trailing`` / ``linspace`` spacings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")

# Keys of a config file that carry no meaning for sampling (bookkeeping, or
# options of schedulers we do not run, e.g. PNDM's PRK steps).
IGNORED_KEYS = frozenset({"_class_name", "_diffusers_version", "_use_default_values", "skip_prk_steps"})


class UnsupportedConfigError(ValueError):
    """A scheduler config field holds a value this engine does not implement."""


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of diffusers' scheduler configs (union over the schedulers we run).

    Fields left ``None`` take the default of the diffusers scheduler that the chosen
    sampler reproduces (e.g. ``timestep_spacing`` is ``"leading"`` for DDIM but
    ``"linspace"`` for DPM-Solver and Euler), exactly as ``X.from_config`` would.
    """

    class_name: str | None = None  # "_class_name" of the file, informational
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: sampler's diffusers default
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False
    clip_sample: bool | None = None  # None: True for DDIM/DDPM (their default)
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    variance_type: str | None = None  # DDPM: None means "fixed_small"
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    # DPM-Solver
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    # Euler
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    # flow matching
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    invert_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        _check(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SchedulerConfig:
        """Build from a diffusers config dict; unknown keys raise, bookkeeping keys are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "_class_name":
                kwargs["class_name"] = value
            elif key in IGNORED_KEYS:
                continue
            elif key in names and key != "class_name":
                kwargs[key] = value
            else:
                raise UnsupportedConfigError(f"scheduler config: unknown field {key!r} (value {value!r})")
        if kwargs.get("lambda_min_clipped") is None:
            kwargs.pop("lambda_min_clipped", None)
        for key in ("base_shift", "max_shift"):  # FLUX configs may write null for these
            if key in kwargs and kwargs[key] is None:
                kwargs.pop(key)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> SchedulerConfig:
        """Read ``scheduler_config.json``; ``path`` may be the file, its folder, or the model root."""
        p = Path(path)
        if p.is_dir():
            p = p / "scheduler_config.json" if (p / "scheduler_config.json").exists() else p / "scheduler" / "scheduler_config.json"
        return cls.from_dict(json.loads(p.read_text()))

    def replace(self, **changes: Any) -> SchedulerConfig:
        return dataclasses.replace(self, **changes)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UnsupportedConfigError(f"scheduler config: {name}={value!r} is not supported (expected one of {allowed})")


def _off(cfg: SchedulerConfig, name: str, why: str = "not implemented") -> None:
    if getattr(cfg, name):
        raise UnsupportedConfigError(f"scheduler config: {name}={getattr(cfg, name)!r} is unsupported ({why})")


def _check(cfg: SchedulerConfig) -> None:
    """Reject values we do not reproduce, naming the field, instead of silently sampling differently."""
    _choice("beta_schedule", cfg.beta_schedule, BETA_SCHEDULES)
    _choice("prediction_type", cfg.prediction_type, PREDICTION_TYPES)
    _choice("timestep_spacing", cfg.timestep_spacing, SPACINGS + (None,))
    _choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
    _choice("variance_type", cfg.variance_type, (None, "fixed_small"))
    _choice("algorithm_type", cfg.algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
    _choice("solver_type", cfg.solver_type, ("midpoint", "heun"))
    _choice("solver_order", cfg.solver_order, (1, 2))
    _choice("interpolation_type", cfg.interpolation_type, ("linear",))
    _choice("timestep_type", cfg.timestep_type, ("discrete",))
    _choice("time_shift_type", cfg.time_shift_type, ("exponential", "linear"))
    _off(cfg, "thresholding", "dynamic thresholding is for pixel-space models")
    for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
        _off(cfg, name)
    _off(cfg, "invert_sigmas")
    _off(cfg, "stochastic_sampling")
    if cfg.num_train_timesteps < 1:
        raise UnsupportedConfigError(f"scheduler config: num_train_timesteps={cfg.num_train_timesteps!r}")


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021: betas from alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    # Python floats (double) then one float32 cast, as diffusers does.
    betas = [min(1 - alpha_bar((k + 1) / n) / alpha_bar(k / n), max_beta) for k in range(n)]
    return torch.tensor(betas, dtype=torch.float32)  # [T]


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift/scale sqrt(alpha_bar) so that alpha_bar_T = 0."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()  # [T]
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))  # [T]
    abar = abar_sqrt**2  # [T]
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])  # [T] undo the cumprod
    return 1 - alphas


class NoiseSchedule:
    """A discrete-time variance-preserving schedule (Ho et al. 2020) plus diffusers' inference grids.

    Attributes (CPU float32, like diffusers):
        betas, alphas, alphas_cumprod: [T]
        final_alpha_cumprod: [] -- alpha_bar "before" t=0 (1 if set_alpha_to_one, else alpha_bar_0)
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        c = config
        T = c.num_train_timesteps
        if c.trained_betas is not None:
            betas = torch.tensor(list(c.trained_betas), dtype=torch.float32)
        elif c.beta_schedule == "linear":
            betas = torch.linspace(c.beta_start, c.beta_end, T, dtype=torch.float32)
        elif c.beta_schedule == "scaled_linear":
            betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, T, dtype=torch.float32) ** 2
        else:  # squaredcos_cap_v2
            betas = betas_for_alpha_bar(T)
        if c.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas  # [T]
        self.alphas = 1.0 - betas  # [T]
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # [T]
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def sigma_alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar as the sigma-space schedulers (Euler, DPM-Solver) use it: a zero terminal
        alpha_bar is replaced by 2**-24 so that sigma_T stays finite."""
        ac = self.alphas_cumprod.clone()  # [T]
        if self.config.rescale_betas_zero_snr:
            ac[-1] = 2**-24
        return ac

    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the VE noise level of Karras et al. 2022. [T]"""
        ac = self.sigma_alphas_cumprod()
        return ((1 - ac) / ac) ** 0.5

    def spacing(self, default: str) -> str:
        return self.config.timestep_spacing or default

    def _check_steps(self, num_steps: int) -> None:
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps={self.num_train_timesteps}]")

    def timesteps(self, num_steps: int, spacing: str | None = None) -> torch.Tensor:
        """Descending int64 timesteps of DDIMScheduler / DDPMScheduler.set_timesteps. [S]"""
        self._check_steps(num_steps)
        T, n = self.num_train_timesteps, num_steps
        spacing = spacing or self.spacing("leading")
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64)
            ts += self.config.steps_offset
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        return self._in_range(torch.from_numpy(ts))

    def _in_range(self, ts: torch.Tensor) -> torch.Tensor:
        if len(ts) and int(ts.max()) >= self.num_train_timesteps:
            raise ValueError(f"steps={len(ts)} puts a timestep at {int(ts.max())} with this scheduler's steps_offset "
                             f"{self.config.steps_offset}, past its {self.num_train_timesteps} training timesteps; "
                             f"use fewer steps")
        return ts

    def inverse_timesteps(self, num_steps: int) -> torch.Tensor:
        """Ascending int64 timesteps of DDIMInverseScheduler.set_timesteps. [S]"""
        self._check_steps(num_steps)
        T, n = self.num_train_timesteps, num_steps
        spacing = self.spacing("leading")
        if spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round().copy().astype(np.int64) + self.config.steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)[::-1]).astype(np.int64) - 1
        else:
            raise UnsupportedConfigError("scheduler config: DDIM inversion supports timestep_spacing 'leading' or 'trailing', not 'linspace'")
        return self._in_range(torch.from_numpy(ts))

    def dpm_timesteps(self, num_steps: int) -> torch.Tensor:
        """Descending int64 timesteps of DPMSolverMultistepScheduler.set_timesteps (may be shorter
        than num_steps with lambda_min_clipped). [S]"""
        self._check_steps(num_steps)
        T, n, c = self.num_train_timesteps, num_steps, self.config
        ac = self.sigma_alphas_cumprod()
        lambdas = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))  # [T]
        clipped = torch.searchsorted(torch.flip(lambdas, [0]), c.lambda_min_clipped)
        last = int(T - clipped)
        spacing = self.spacing("linspace")
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + c.steps_offset
        else:  # trailing
            ts = np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
        return self._in_range(torch.from_numpy(ts))

    def euler_timesteps(self, num_steps: int) -> torch.Tensor:
        """Descending float32 timesteps of EulerDiscreteScheduler.set_timesteps. [S]"""
        self._check_steps(num_steps)
        T, n = self.num_train_timesteps, num_steps
        spacing = self.spacing("linspace")
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32)
            ts += self.config.steps_offset
        else:  # trailing
            ts = np.arange(T, 0, -T / n).round().copy().astype(np.float32) - 1
        return torch.from_numpy(ts)

    def sigmas_at(self, timesteps: torch.Tensor, final_zero: bool = False) -> torch.Tensor:
        """sigma at (possibly fractional) timesteps plus the final sigma, as Euler / DPM-Solver
        build them: float64 linear interpolation, then float32 (``final_zero``: 0 whatever the
        config says, as Euler ancestral). [S+1]"""
        table = self.sigmas().numpy()  # [T] float32
        sig = np.interp(timesteps.numpy(), np.arange(0, len(table)), table)  # [S] float64
        if self.config.final_sigmas_type == "sigma_min" and not final_zero:
            ac0 = self.alphas_cumprod[0]
            last = ((1 - ac0) / ac0) ** 0.5
        else:
            last = 0
        return torch.from_numpy(np.concatenate([sig, [last]]).astype(np.float32))


def flow_shift_mu(image_seq_len: int, config: SchedulerConfig) -> float:
    """The resolution-dependent shift mu of FLUX (Esser et al. 2024, sec. 5.3.2): linear in the
    number of latent tokens between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    c = config
    m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    b = c.base_shift - m * c.base_image_seq_len
    return image_seq_len * m + b


def flow_sigmas(config: SchedulerConfig, num_steps: int, mu: float | None = None, base=None) -> torch.Tensor:
    """Descending sigmas of FlowMatchEulerDiscreteScheduler.set_timesteps plus a final 0. [S+1]

    Rectified flow (Liu et al. 2022; Esser et al. 2024): x_sigma = (1 - sigma) x_0 + sigma * noise.
    As in diffusers, the grid is spaced between the *shifted* training sigma extremes and then
    shifted again (static ``shift``) or time-shifted by ``mu`` (``use_dynamic_shifting``).
    ``base``: the unshifted grid given instead (``set_timesteps(sigmas=...)``; FluxPipeline passes
    ``linspace(1, 1/S, S)``, see :func:`flux_base_sigmas`).
    """
    c, T = config, config.num_train_timesteps
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if c.use_dynamic_shifting and mu is None:
        raise ValueError("this flow-matching config uses dynamic shifting: pass mu (see flow_shift_mu)")
    if base is not None:
        sig = np.asarray(base, dtype=np.float32)  # [S] float32, as diffusers casts given sigmas
        if sig.shape != (num_steps,):
            raise ValueError(f"{len(sig)} base sigmas for {num_steps} steps")
    else:
        train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T  # [T] float32
        if not c.use_dynamic_shifting:
            train = c.shift * train / (1 + (c.shift - 1) * train)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        sig = np.linspace(sigma_max * T, sigma_min * T, num_steps) / T  # [S] float64
    if c.use_dynamic_shifting:
        if c.time_shift_type == "exponential":
            sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1) ** 1.0)
        else:
            sig = mu / (mu + (1 / sig - 1) ** 1.0)
    else:
        sig = c.shift * sig / (1 + (c.shift - 1) * sig)
    if c.shift_terminal:
        one_minus = 1 - sig
        sig = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
    sig = torch.from_numpy(sig).to(torch.float32)  # [S]
    return torch.cat([sig, torch.zeros(1)])  # [S+1]


def flux_base_sigmas(num_steps: int) -> np.ndarray:
    """The unshifted grid FluxPipeline hands its scheduler: linspace(1, 1/S, S)."""
    return np.linspace(1.0, 1 / num_steps, num_steps)
