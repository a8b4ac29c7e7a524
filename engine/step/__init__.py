"""The step layer: one batched model call per step for every program (below the façade).

* :mod:`guidance` -- classifier-free guidance as a component (per-row scales);
* :mod:`denoiser` -- the model call on rows (family conditioning, eager or CUDA graphs);
  :mod:`flux_denoiser` -- the same for FLUX transformers (packing, RoPE ids, embedded guidance);
* :mod:`program`  -- what a request contributes: rows, plan, combine, advance;
* :mod:`plans`    -- merging programs' attention plans with row offsets;
* :mod:`chain`    -- programs in sequence (two-pass methods) as one program;
* :mod:`loop`     -- the one loop (``run``, ``Loop`` for join/leave) and ``sample``.
"""

from .chain import Chain
from .denoiser import Denoiser, RowCond, UNetDenoiser
from .flux_denoiser import FluxDenoiser
from .guidance import Guidance, cfg_combine, rescale_guidance
from .loop import BUCKET_ROWS, CallableDenoiser, Loop, run, sample
from .plans import MergedPlan, merge
from .program import Program, SamplerProgram, drawn_noise, stored_noise

__all__ = ["Chain", "Guidance", "cfg_combine", "rescale_guidance", "RowCond", "Denoiser", "UNetDenoiser", "FluxDenoiser", "CallableDenoiser", "Program", "SamplerProgram",
           "drawn_noise", "stored_noise", "Loop", "run", "sample", "BUCKET_ROWS", "MergedPlan", "merge"]
