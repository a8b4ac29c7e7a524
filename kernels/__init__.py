"""overpaint kernels: fused attention with map store, row injection and IP-Adapter.

``attention`` runs the Triton kernel on CUDA tensors (and on CPU under
``TRITON_INTERPRET=1``); other CPU calls use the torch path in ``reference.py``.
``attention_reference`` is the float64 ground truth.
"""
from .reference import attention_reference, attention_torch, check_inputs, needs_grad

try:
    from .attention import attention
except ImportError as e:  # CPU-only install without triton: torch path only
    if "triton" not in str(e):
        raise
    _TRITON_IMPORT_ERROR = e

    def attention(q, k, v, **kwargs):
        check_inputs(q, k, v, **kwargs)
        if q.is_cuda and not needs_grad(q, k, v, kwargs.get("token_weights"), kwargs.get("ip")):
            raise RuntimeError("kernels.attention: CUDA tensors need triton; pip install 'overpaint[triton]'"
                               ) from _TRITON_IMPORT_ERROR
        return attention_torch(q, k, v, **kwargs)

__all__ = ["attention", "attention_reference", "attention_torch", "check_inputs", "needs_grad"]
