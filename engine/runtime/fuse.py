"""Compiled and channels-last execution of the UNet (opt-in; results equal eager up to
kernel rounding).

``compile_unet`` compiles the UNet in place (``nn.Module.compile``: the module object,
its attributes and the pipeline's references stay as they are) with the inductor cache
under the user cache directory, so compiled kernels persist across runs and the second
process skips most of the compile time. ``channels_last`` converts the 4-D weights so
convolutions run NHWC (the layout cuDNN's fastest kernels use on recent GPUs).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("overpaint")


def cache_dir() -> Path:
    """overpaint's cache folder: $XDG_CACHE_HOME/overpaint (default ~/.cache/overpaint)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "overpaint"


def set_inductor_cache() -> Path:
    """Point torch inductor's cache at the user cache, unless the user chose one.

    Importing inductor writes its default (a per-user folder under /tmp, wiped on reboot)
    into TORCHINDUCTOR_CACHE_DIR, so that value counts as "not chosen". Inductor reads the
    variable at each compile, so setting it here is enough."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def compile_unet(pipe, mode: str | None = None, fullgraph: bool = False, dynamic: bool = False) -> None:
    """Compile ``pipe.model`` (the UNet, or a FLUX transformer) in place with torch.compile (the
    first call pays the compile time; see benchmarks/e2e.py, which reports it separately as
    ``compile_s``)."""
    set_inductor_cache()
    pipe.model.compile(mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    log.info("compiled the %s (mode=%s); inductor cache %s", type(pipe.model).__name__, mode,
             os.environ["TORCHINDUCTOR_CACHE_DIR"])


def uncompile(pipe) -> None:
    """Undo `compile_unet`: the module runs eagerly again."""
    pipe.model._compiled_call_impl = None


def is_compiled(pipe) -> bool:
    return getattr(pipe.model, "_compiled_call_impl", None) is not None


def channels_last(pipe) -> None:
    """Convert the UNet's 4-D parameters to channels-last (NHWC) memory format in place (a FLUX
    transformer has none: a no-op there)."""
    pipe.model.to(memory_format=torch.channels_last)
