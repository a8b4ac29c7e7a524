"""Numbers checked where they enter the engine: every request's parameters, by name.

``check(params, max_steps)`` returns a normalised copy (integral floats such as ``30.0``
become ``30``, out-of-range seeds are reduced modulo 2**64 with a notice) or raises a
``ValueError`` that names the argument and says what it takes. Names it does not know
pass through untouched: each method still checks its own.
"""

from __future__ import annotations

import logging
import math
import numbers

log = logging.getLogger("overpaint")

SEED_RANGE = (-(2 ** 63), 2 ** 64)  # what torch.Generator.manual_seed accepts


def integer(name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (or an integral float) within [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or (
            isinstance(v, float) and (not math.isfinite(v) or v != int(v))):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        where = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"{name} must be {where}, got {v}")
    return v


def number(name: str, v, lo: float | None = None, hi: float | None = None, hi_open: bool = False) -> float:
    """A finite real number within [lo, hi] (or [lo, hi) with ``hi_open``)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    v = float(v)
    if (lo is not None and v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
        bounds = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {bounds}, got {v}")
    return v


def seed(name: str, v) -> int:
    """An integer seed; outside torch's 64-bit range it is reduced modulo 2**64, with a notice."""
    v = integer(name, v)
    if not SEED_RANGE[0] <= v < SEED_RANGE[1]:
        reduced = v % 2 ** 64
        log.warning("%s %d is outside 64 bits: using %d (it modulo 2**64)", name, v, reduced)
        v = reduced
    return v


def _each(check):
    """A check that also takes a list or tuple of values (one per concept)."""
    def run(name, v):
        if isinstance(v, (list, tuple)):
            return type(v)(check(f"{name}[{i}]", x) for i, x in enumerate(v))
        return check(name, v)
    return run


def _fraction_or_range(name, v):
    """P2P's step fractions: a fraction, a (start, end) pair, or a {word: fraction} dict."""
    if isinstance(v, dict):
        return {k: _fraction_or_range(f"{name}[{k!r}]", x) for k, x in v.items()}
    return _each(lambda n, x: number(n, x, 0.0, 1.0))(name, v)


def _optional(check):
    return lambda name, v: None if v is None else check(name, v)


def _checks(max_steps: int) -> dict:
    finite = lambda n, v: number(n, v)  # noqa: E731
    nonneg = lambda n, v: number(n, v, 0.0)  # noqa: E731
    fraction = lambda n, v: number(n, v, 0.0, 1.0)  # noqa: E731
    side = _optional(lambda n, v: integer(n, v, 1, 16384))
    steps = lambda n, v: integer(n, v, 1, max_steps)  # noqa: E731
    return {
        "steps": steps, "num_inversion_steps": steps,
        "guidance_scale": finite, "source_guidance_scale": _optional(finite),
        "edit_guidance_scale": _each(finite), "guidance_rescale": fraction,
        "edit_threshold": _each(fraction), "edit_warmup_steps": _each(lambda n, v: integer(n, v, 0)),
        "edit_cooldown_steps": _optional(_each(lambda n, v: integer(n, v, 0))),
        "seed": _optional(seed), "height": side, "width": side,
        "num_images": lambda n, v: integer(n, v, 1, 1024), "batch_size": lambda n, v: integer(n, v, 1),
        "skip": _optional(lambda n, v: number(n, v, 0.0, 1.0, hi_open=True)), "eta": nonneg,
        "cross_replace_steps": _fraction_or_range, "self_replace_steps": _fraction_or_range,
        "blend_threshold": fraction, "blend_start": fraction, "blend_resolution": lambda n, v: integer(n, v, 1),
        "denoising_end": _optional(fraction), "num_zero_noise_steps": _optional(lambda n, v: integer(n, v, 0)),
        "gamma": fraction, "start": fraction, "stop": fraction, "eta_decay_power": nonneg,
        "embedded_guidance": _optional(finite),
    }


def check(params: dict, max_steps: int = 1000) -> dict:
    """A checked, normalised copy of a request's parameters (see the module docstring)."""
    checks = _checks(max_steps)
    return {k: checks[k](k, v) if k in checks else v for k, v in params.items()}
