"""Plain torch attention with the same semantics as the Triton kernel in ``attention.py``.

``attention_torch`` is the CPU execution path: without store/weights/IP it calls
``torch.nn.functional.scaled_dot_product_attention`` on the (injected) rows, so it
matches diffusers (which uses SDPA) bit-for-bit in fp32; otherwise it does explicit
fp32 math.  ``attention_reference`` is the float64 ground truth used by the tests.
The Triton kernel computes the same thing blockwise with the FlashAttention-2
online softmax (Dao, 2023).
"""
import torch
import torch.nn.functional as F

SUPPORTED_HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128, 160, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_STORE_NK = 512  # keys whose maps can be stored (SD's 77 prompt tokens; FLUX's up to 512 text tokens)


def _fail(msg):
    raise ValueError(f"kernels.attention: {msg}")


def store_span(n_q: int, n_k: int, store_queries=None, store_keys=None) -> tuple[int, int, int, int]:
    """(q0, q1, k0, k1): the block of the probability matrix a store receives (all by default)."""
    q0, q1 = store_queries if store_queries is not None else (0, n_q)
    k0, k1 = store_keys if store_keys is not None else (0, n_k)
    return q0, q1, k0, k1


def check_inputs(q, k, v, *, scale=None, q_from=None, k_from=None, v_from=None, token_weights=None,
                 store=None, ip=None, out=None, store_rows=None, store_queries=None, store_keys=None,
                 key_class=None, query_class=None):
    """Validate shapes/dtypes/devices; every message says what to change."""
    for name, span, n in (("store_queries", store_queries, q.shape[2] if q.dim() == 4 else 0),
                          ("store_keys", store_keys, k.shape[2] if k.dim() == 4 else 0)):
        if span is None:
            continue
        if store is None:
            _fail(f"{name} needs store")
        if not (isinstance(span, tuple) and len(span) == 2 and all(isinstance(i, int) for i in span)
                and 0 <= span[0] < span[1] <= n):
            _fail(f"{name} must be a (start, stop) pair of ints with 0 <= start < stop <= {n}, got {span!r}")
    if store_rows is not None:
        if store is None:
            _fail("store_rows needs store")
        if not all(isinstance(r, tuple) and len(r) == 2 and 0 <= r[0] <= r[1] <= q.shape[0] for r in store_rows):
            _fail(f"store_rows must be ((start, stop), ...) within the {q.shape[0]} rows, got {store_rows!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            _fail(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}; "
                  f"reshape with x.view(B, N, H, D).transpose(1, 2)")
        if t.dtype not in SUPPORTED_DTYPES:
            _fail(f"{name} has dtype {t.dtype}; use float16, bfloat16 or float32")
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}; move all tensors to one device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, n_q, D = q.shape
    if k.shape != v.shape:
        _fail(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        _fail(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in B, H or D "
              f"(expected [{B}, {H}, Nk, {D}])")
    n_k = k.shape[2]
    if D not in SUPPORTED_HEAD_DIMS:
        _fail(f"head dim D={D} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if n_q == 0 or n_k == 0 or B == 0 or H == 0:
        _fail(f"empty attention (q {tuple(q.shape)}, k {tuple(k.shape)}); all sizes must be > 0")
    if scale is not None and not isinstance(scale, (int, float)):
        _fail(f"scale must be a python float or None, got {type(scale).__name__}")
    for name, idx in (("q_from", q_from), ("k_from", k_from), ("v_from", v_from)):
        if idx is None:
            continue
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
            _fail(f"{name} must be an int32/int64 tensor of shape [{B}], got "
                  f"{getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.shape != (B,):
            _fail(f"{name} must have shape [{B}] (one source row per batch row), got {tuple(idx.shape)}")
        if idx.device != q.device:
            _fail(f"{name} is on {idx.device} but q is on {q.device}; move it with .to(q.device)")
        if idx.device.type == "cpu" and (int(idx.min()) < 0 or int(idx.max()) >= B):
            _fail(f"{name} has values {idx.tolist()} outside [0, {B}); indices must name rows of the batch")
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or not token_weights.is_floating_point():
            _fail("token_weights must be a floating-point tensor [B, Nk]")
        if token_weights.shape != (B, n_k):
            _fail(f"token_weights must have shape [B, Nk] = [{B}, {n_k}], got {tuple(token_weights.shape)}")
        if token_weights.device != q.device:
            _fail(f"token_weights is on {token_weights.device} but q is on {q.device}")
    if store is not None:
        if not isinstance(store, torch.Tensor) or store.dtype not in (torch.float16, torch.float32):
            _fail(f"store must be a float16 or float32 tensor, got {getattr(store, 'dtype', type(store).__name__)}")
        q0, q1, k0, k1 = store_span(n_q, n_k, store_queries, store_keys)
        if store.shape != (B, q1 - q0, k1 - k0):
            _fail(f"store must have shape [B, Nq, Nk] = [{B}, {q1 - q0}, {k1 - k0}] (the stored queries and keys), "
                  f"got {tuple(store.shape)}")
        if store.device != q.device:
            _fail(f"store is on {store.device} but q is on {q.device}")
        if k1 - k0 > MAX_STORE_NK:
            _fail(f"store is only supported for up to {MAX_STORE_NK} keys (cross-attention, or a key range with "
                  f"store_keys), got {k1 - k0}; do not request maps for self-attention layers")
    if ip is not None:
        if not isinstance(ip, (tuple, list)) or len(ip) != 3:
            _fail("ip must be a tuple (k_img, v_img, scale)")
        ki, vi, s = ip
        for name, t in (("ip k_img", ki), ("ip v_img", vi)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                _fail(f"{name} must be a 4-D tensor [B, H, Nip, D]")
            if t.shape[0] != B or t.shape[1] != H or t.shape[3] != D or t.shape[2] == 0:
                _fail(f"{name} has shape {tuple(t.shape)}; expected [{B}, {H}, Nip, {D}]")
            if t.dtype != q.dtype or t.device != q.device:
                _fail(f"{name} must match q in dtype and device ({q.dtype}, {q.device}), "
                      f"got ({t.dtype}, {t.device})")
        if ki.shape != vi.shape:
            _fail(f"ip k_img and v_img shapes differ: {tuple(ki.shape)} vs {tuple(vi.shape)}")
        if isinstance(s, torch.Tensor):
            if s.shape != (B,) or not s.is_floating_point() or s.device != q.device:
                _fail(f"ip scale tensor must be floating [{B}] on {q.device}, "
                      f"got {s.dtype} {tuple(s.shape)} on {s.device}")
        elif not isinstance(s, (int, float)):
            _fail(f"ip scale must be a python float or a tensor [B], got {type(s).__name__}")
    if (key_class is None) != (query_class is None):
        _fail("key_class and query_class go together: give both ([B, Nk] and [B, Nq]) or neither")
    if key_class is not None:
        if store is not None:
            _fail("key_class cannot be combined with store: classes restrict self-attention reads, maps are "
                  "stored from cross-attention layers")
        for name, t, n, low in (("key_class", key_class, n_k, 0), ("query_class", query_class, n_q, -1)):
            if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
                _fail(f"{name} must be an integer or bool tensor [B, N], got {getattr(t, 'dtype', type(t).__name__)}")
            if t.shape != (B, n):
                _fail(f"{name} must have shape [{B}, {n}], got {tuple(t.shape)}")
            if t.device != q.device:
                _fail(f"{name} is on {t.device} but q is on {q.device}; move it with .to(q.device)")
            if t.device.type == "cpu" and t.numel() and (int(t.min()) < low or int(t.max()) > 1):
                _fail(f"{name} values must be in [{low}, 1] (key classes 0 / 1; query class -1 reads every key)")
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            _fail(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                  f"{tuple(out.shape)} {out.dtype} on {out.device}")


def needs_grad(q, k, v, token_weights=None, ip=None) -> bool:
    """True when autograd records this call (an input requires grad and grad mode is on):
    then the differentiable torch path runs, whatever the device. Stored maps written by
    that path (``store.copy_``) carry gradients too."""
    if not torch.is_grad_enabled():
        return False
    ts = [q, k, v, token_weights] + ([] if ip is None else [t for t in ip if isinstance(t, torch.Tensor)])
    return any(t is not None and t.requires_grad for t in ts)


def _rows(t, idx):
    return t if idx is None else t.index_select(0, idx.long())


def class_mask(key_class, query_class):
    """[B, 1, Nq, Nk] bool: which keys each query reads. Query i of row b reads the keys j with
    key_class[b, j] == query_class[b, i]; a query class of -1, or one no key of the row has,
    reads every key (MasaCtrl's mask-guided reads: foreground queries read the foreground)."""
    kc, qc = key_class.long(), query_class.long()
    has0, has1 = (kc == 0).any(1, keepdim=True), (kc == 1).any(1, keepdim=True)  # [B, 1]
    keep = ((qc == 0) & has0) | ((qc == 1) & has1)  # [B, Nq]: other values read every key (no device assert)
    qc = torch.where(keep, qc, -1)
    return ((kc[:, None, :] == qc[:, :, None]) | (qc[:, :, None] < 0))[:, None]  # [B, 1, Nq, Nk]


def _explicit(q, k, v, scale, token_weights, store, ip, dtype, span=None, mask=None):
    """softmax(q kᵀ·scale)·w then @ v, in `dtype`; fills `store` with the head mean (of the block
    ``span`` = (q0, q1, k0, k1) of the probabilities, all of them when None). ``mask``
    ([B, 1, Nq, Nk] bool, :func:`class_mask`) restricts each query's softmax to its keys."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)  # [B, H, Nq, Nk]
    if token_weights is not None:
        p = p * token_weights.to(dtype)[:, None, None, :]
    if store is not None:
        q0, q1, k0, k1 = span or store_span(p.shape[2], p.shape[3])
        store.copy_(p[:, :, q0:q1, k0:k1].mean(dim=1))
    o = p @ v.to(dtype)  # [B, H, Nq, D]
    if ip is not None:
        ki, vi, ip_s = ip
        pi = torch.softmax((q.to(dtype) @ ki.to(dtype).transpose(-1, -2)) * scale, dim=-1)
        ip_s = ip_s.to(dtype)[:, None, None, None] if isinstance(ip_s, torch.Tensor) else ip_s
        o = o + ip_s * (pi @ vi.to(dtype))
    return o


def attention_torch(q, k, v, *, scale=None, q_from=None, k_from=None, v_from=None, token_weights=None,
                    store=None, ip=None, out=None, store_rows=None, store_queries=None, store_keys=None,
                    key_class=None, query_class=None):
    """Torch execution path (CPU); SDPA when no probabilities are needed explicitly.

    ``store_rows``: ((start, stop), ...), the only rows whose maps are wanted: the others take
    SDPA as they would without a store, so a row computes the same whatever else shares its
    batch (rows of other requests in the one loop)."""
    if store is not None and store_rows is not None and token_weights is None:
        o = attention_torch(q, k, v, scale=scale, q_from=q_from, k_from=k_from, v_from=v_from, ip=ip)
        for s, e in store_rows:
            o[s:e] = attention_torch(q, k, v, scale=scale, q_from=_span(q_from, s, e, q.device),
                                     k_from=_span(k_from, s, e, q.device), v_from=_span(v_from, s, e, q.device), store=store[s:e],
                                     ip=None if ip is None else _ip_rows(ip, s, e), store_queries=store_queries,
                                     store_keys=store_keys)
        if out is not None:
            out.copy_(o)
            return out
        return o
    q, k, v = _rows(q, q_from), _rows(k, k_from), _rows(v, v_from)
    mask = None if key_class is None else class_mask(key_class, query_class)  # [B, 1, Nq, Nk]
    if store is None and token_weights is None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        if ip is not None:
            ki, vi, s = ip
            oi = F.scaled_dot_product_attention(q, ki, vi, scale=scale)
            s = s.to(oi.dtype)[:, None, None, None] if isinstance(s, torch.Tensor) else s
            o = o + s * oi
    else:
        span = store_span(q.shape[2], k.shape[2], store_queries, store_keys)
        o = _explicit(q, k, v, scale, token_weights, store, ip, torch.float32, span, mask).to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


def _span(idx, s: int, e: int, device):
    """Rows s:e as an index tensor into the full batch (their own rows when idx is None)."""
    return torch.arange(s, e, device=device) if idx is None else idx[s:e]


def _ip_rows(ip, s: int, e: int):
    ki, vi, scale = ip
    per_row = isinstance(scale, torch.Tensor) and scale.dim() == 1
    return ki[s:e], vi[s:e], scale[s:e] if per_row else scale


def attention_reference(q, k, v, *, scale=None, q_from=None, k_from=None, v_from=None, token_weights=None,
                        store=None, ip=None, compute_dtype=torch.float64, store_queries=None, store_keys=None,
                        key_class=None, query_class=None):
    """Ground truth: explicit math in `compute_dtype` (float64 by default), output in that dtype.

    ``store`` may be any floating dtype (the tests pass float64); it is filled by copy.
    """
    q, k, v = _rows(q, q_from), _rows(k, k_from), _rows(v, v_from)
    span = store_span(q.shape[2], k.shape[2], store_queries, store_keys)
    mask = None if key_class is None else class_mask(key_class, query_class)
    return _explicit(q, k, v, scale, token_weights, store, ip, compute_dtype, span, mask)
