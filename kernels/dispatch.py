"""Best-backend dispatch for plain attention (no instruction).

A call with no injection, weights, store or IP-Adapter branch is ordinary attention: on a
GPU it goes to whichever implementation was measured fastest for the shape on this device
(our kernel, or torch SDPA's flash / memory-efficient / cuDNN backends), read from the same
table as the block sizes (``kernels/configs.py``; written by ``benchmarks/attention.py
--write-table`` on the GPU and shipped with the package).  Without a measurement: ours.
Calls with instructions always run our kernel: only it can carry them in the same pass.
"""
import functools

import torch
import torch.nn.functional as F

from . import configs

BACKENDS = ("ours", "flash", "efficient", "cudnn", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def choose(device: str, dtype, D: int, n_q: int, n_k: int) -> str:
    """The measured-fastest backend for a plain call of this shape on the named device ("ours" if unmeasured)."""
    entry = configs.lookup(device, dtype, D, n_q, n_k, "plain")
    name = entry.get("backend", "ours") if entry is not None else "ours"
    return name if name in BACKENDS else "ours"


@functools.lru_cache(maxsize=4096)
def _choose_cuda(device_index: int, dtype, D: int, n_q: int, n_k: int) -> str:
    return choose(configs.device_name(torch.device("cuda", device_index)), dtype, D, n_q, n_k)


def backend(q, k) -> str:
    """The backend for a plain call with these inputs ("ours" off CUDA or without a table)."""
    if not q.is_cuda:
        return "ours"
    return _choose_cuda(q.device.index or 0, q.dtype, q.shape[-1], q.shape[2], k.shape[2])


def sdpa(name: str, q, k, v, *, scale=None, out=None):
    """torch SDPA restricted to one backend. flash / efficient return their output in the
    [B, N, H, D] memory layout already, so the engine's out-projection reads it without a copy."""
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel([_sdpa_backend(name)]):
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # [B, H, Nq, D]
    if out is not None:
        out.copy_(o)
        return out
    return o


def clear_cache():
    _choose_cuda.cache_clear()
    configs.clear_cache()
