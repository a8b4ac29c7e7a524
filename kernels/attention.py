"""Fused Triton attention that can inject rows, reweight keys and store maps.

One forward kernel computes ``softmax(q kᵀ · scale) v`` with the online softmax
of FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", arXiv:2307.08691): per query block it streams
key blocks, keeps a running row max ``m`` and row sum ``l`` in fp32 and rescales
the accumulator, so no Nq×Nk matrix ever exists in memory.  On top of that:

* inject   -- row b reads q/k/v of rows ``q_from[b]``/``k_from[b]``/``v_from[b]``
              by offsetting the batch pointer with the loaded index (no copies);
* reweight -- probabilities are multiplied by ``token_weights[b]`` before they
              meet v; the softmax denominator stays unweighted (no renormalising);
* ip       -- a second online-softmax accumulator over IP-Adapter image keys,
              added as ``ip_scale · softmax(q k_imgᵀ) v_img`` in the same pass;
* store    -- the forward kernel also writes the row log-sum-exp per head; a second
              small kernel (Nk <= 256) recomputes ``q kᵀ`` per key tile, sums
              ``exp(s - lse)`` over heads in registers in a fixed order and writes
              the head-mean once.  No atomics, so maps are bit-reproducible.

Head dims that are not powers of two (40, 80, 160) are padded to BLOCK_D with
masked loads.  CPU tensors use the torch path in ``reference.py`` unless
``TRITON_INTERPRET=1`` is set at call time; then the kernels run in Triton's
interpreter, which requires the variable to be set before triton is imported
(see ``_check_interpreter``).  Note ``kernels.attention`` is this module's
``attention`` function; reach the module itself via ``sys.modules["kernels.attention"]``.
"""
import os

import torch
import triton
import triton.language as tl

from .reference import attention_torch, check_inputs, needs_grad, store_span


@triton.jit
def _attn_inner(acc, l_i, m_i, q, K, V, W, s_kn, s_kd, s_vn, s_vd, s_wn, qk_scale, start, end, N_K,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_W: tl.constexpr, MASK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N_K
        kt = tl.load(K + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASK_N:  # only the tail block holds keys past N_K
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # denominator uses unweighted p
        if HAS_W:
            w = tl.load(W + offs_n * s_wn, mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
            p = p * w[None, :]
        v = tl.load(V + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, QF, KF, VF, W, KI, VI, IPS, LSE,
              s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
              s_ob, s_oh, s_on, s_od, s_wb, s_wn,
              s_kib, s_kih, s_kin, s_kid, s_vib, s_vih, s_vin, s_vid,
              sm_scale, ip_scale, H, N_Q, N_K, N_IP,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_IP: tl.constexpr, HAS_QF: tl.constexpr, HAS_KF: tl.constexpr, HAS_VF: tl.constexpr,
              HAS_W: tl.constexpr, HAS_IP: tl.constexpr, IP_PER_ROW: tl.constexpr, STORE_LSE: tl.constexpr,
              DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)
    # Injection: pick the source row of each operand, then read it in place.
    qb = b.to(tl.int64)
    kb = b.to(tl.int64)
    vb = b.to(tl.int64)
    if HAS_QF:
        qb = tl.load(QF + b).to(tl.int64)
    if HAS_KF:
        kb = tl.load(KF + b).to(tl.int64)
    if HAS_VF:
        vb = tl.load(VF + b).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N_Q
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + qb * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2 e)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    Kb = K + kb * s_kb + h * s_kh
    Vb = V + vb * s_vb + h * s_vh
    Wb = W + b.to(tl.int64) * s_wb
    # Full key blocks without the -inf mask, then the ragged tail (e.g. 77 text tokens).
    n_full = (N_K // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, Kb, Vb, Wb, s_kn, s_kd, s_vn, s_vd, s_wn, qk_scale,
                                0, n_full, N_K, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_W, False, DOT_PREC)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, Kb, Vb, Wb, s_kn, s_kd, s_vn, s_vd, s_wn, qk_scale,
                                n_full, N_K, N_K, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_W, True, DOT_PREC)
    out = acc / l_i[:, None]  # [BLOCK_M, BLOCK_D]

    if HAS_IP:  # decoupled cross-attention: its own max/sum/accumulator, same q tile
        m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l2 = tl.zeros([BLOCK_M], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bi = b.to(tl.int64)
        acc2, l2, m2 = _attn_inner(acc2, l2, m2, q, KI + bi * s_kib + h * s_kih, VI + bi * s_vib + h * s_vih,
                                   W, s_kin, s_kid, s_vin, s_vid, 0, qk_scale, 0, N_IP, N_IP,
                                   HEAD_DIM, BLOCK_D, BLOCK_IP, False, True, DOT_PREC)
        s = ip_scale
        if IP_PER_ROW:
            s = tl.load(IPS + b).to(tl.float32)
        out = out + s * (acc2 / l2[:, None])

    tl.store(O + b.to(tl.int64) * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if STORE_LSE:  # log2-domain log-sum-exp per (b, h, row) for the map kernel
        tl.store(LSE + (b.to(tl.int64) * H + h) * N_Q + offs_m, m_i + tl.math.log2(l_i), mask=m_mask)


@triton.jit
def _attn_map(Q, K, QF, KF, W, LSE, S,
              s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_wb, s_wn, s_sb, s_sq, s_sk,
              sm_scale, H, N_Q, N_K,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_QF: tl.constexpr, HAS_KF: tl.constexpr, HAS_W: tl.constexpr, DOT_PREC: tl.constexpr):
    # One program owns one [BLOCK_M, BLOCK_N] tile of store[b] and loops over all
    # heads in a fixed order: a plain store, no atomics, bit-reproducible.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    qb = b
    kb = b
    if HAS_QF:
        qb = tl.load(QF + b).to(tl.int64)
    if HAS_KF:
        kb = tl.load(KF + b).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N_Q
    n_mask = offs_n < N_K
    d_mask = offs_d < HEAD_DIM
    qk_scale = sm_scale * 1.4426950408889634
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h in range(0, H):
        q = tl.load(Q + qb * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        kt = tl.load(K + kb * s_kb + h * s_kh + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        lse = tl.load(LSE + (b * H + h) * N_Q + offs_m, mask=m_mask, other=0.0)  # [BLOCK_M]
        qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        total += tl.math.exp2(qk - lse[:, None])
    total = total / H
    if HAS_W:  # the weight is per key, so it factors out of the head mean
        w = tl.load(W + b * s_wb + offs_n * s_wn, mask=n_mask, other=0.0).to(tl.float32)
        total = total * w[None, :]
    tl.store(S + b * s_sb + offs_m[:, None] * s_sq + offs_n[None, :] * s_sk, total.to(S.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configurations for H100 (sm_90): BLOCK_M=128 with 8 warps gives two warpgroups that
# each issue wgmma on 64 rows; D=256 (padded 160) needs 64-row tiles and 8 warps to avoid spills
# (see `python -m kernels.check`).  The autotuner is keyed on the shape; pruning drops configs
# that spill or waste work on short sequences.
# ---------------------------------------------------------------------------------------------
def _fwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                                          (64, 32, 4, 2), (64, 128, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)]]


def _prune_fwd(configs, named_args, **kwargs):
    block_d, n_q, n_k = kwargs["BLOCK_D"], named_args["N_Q"], named_args["N_K"]
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if block_d >= 256 and (bm > 64 or bn > 64 or c.num_warps < 8):  # 64x256 fp32 acc needs 8 warps
            continue
        if block_d < 256 and bm == 64 and c.num_warps == 8:
            continue
        if bm > 64 and n_q <= 64:  # small Nq (SD1.5 deepest level): more programs win
            continue
        if bn > max(32, triton.next_power_of_2(n_k)):  # Nk=77 does not need 128-wide tiles
            continue
        keep.append(c)
    return keep or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)]


_attn_fwd_tuned = triton.autotune(
    configs=_fwd_configs(), key=["N_Q", "N_K", "N_IP", "H", "HEAD_DIM", "HAS_W", "HAS_IP", "STORE_LSE"],
    prune_configs_by={"early_config_prune": _prune_fwd})(_attn_fwd)


def default_config(n_q, n_k, block_d, interpret=False, elem_bytes=2):
    """Block sizes when not autotuning (interpreter, CUDA graphs, AOT check)."""
    if interpret:  # big numpy tiles are what makes the interpreter bearable
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    if elem_bytes > 2:  # fp32 (not a fast path): halve the shared-memory footprint
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4 if block_d <= 128 else 8, num_stages=2)
    if block_d >= 256:  # 8 warps keep the [64, 256] fp32 accumulators (x2 with IP) out of local memory
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if n_q <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def map_config(n_k, block_d, interpret=False):
    bn = min(64, max(16, triton.next_power_of_2(n_k)))
    if interpret:
        return dict(BLOCK_M=64, BLOCK_N=max(bn, 64), num_warps=4, num_stages=1)
    # BLOCK_M=64 per warpgroup so sm_90 gets wgmma; the head loop is the pipelined loop.
    return dict(BLOCK_M=64, BLOCK_N=bn, num_warps=4 if block_d <= 128 else 8, num_stages=2)


AUTOTUNE = os.environ.get("OVERPAINT_AUTOTUNE", "1") != "0"  # off for CUDA-graph capture


def attention_triton(q, k, v, *, scale=None, q_from=None, k_from=None, v_from=None, token_weights=None,
                     store=None, ip=None, out=None, config=None, store_rows=None, store_queries=None, store_keys=None):
    """Launch the Triton kernels.  Inputs must already be validated (see ``attention``).
    ``store_rows`` is accepted and ignored: the map kernel writes every row, and no row's
    output depends on whether its maps are stored."""
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    interpret = _interpreting()
    scale = D ** -0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, H, Nq, D]
    dummy = q  # stands in for absent optional pointers; never dereferenced
    has_ip = ip is not None
    ki, vi, ips_t, ip_scale, n_ip, per_row = dummy, dummy, dummy, 0.0, 0, False
    if has_ip:
        ki, vi, ip_s = ip
        n_ip = ki.shape[2]
        if isinstance(ip_s, torch.Tensor):
            ips_t, per_row = ip_s, True
        else:
            ip_scale = float(ip_s)
    w = token_weights if token_weights is not None else dummy
    s_w = token_weights.stride() if token_weights is not None else (0, 0)
    lse = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32) if store is not None else dummy
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    args = (q, k, v, out,
            q_from if q_from is not None else dummy, k_from if k_from is not None else dummy,
            v_from if v_from is not None else dummy, w, ki, vi, ips_t, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *s_w, *ki.stride(), *vi.stride(),
            scale, ip_scale, H, n_q, n_k, n_ip)
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_IP=max(16, min(64, triton.next_power_of_2(max(n_ip, 1)))),
                 HAS_QF=q_from is not None, HAS_KF=k_from is not None, HAS_VF=v_from is not None,
                 HAS_W=token_weights is not None, HAS_IP=has_ip, IP_PER_ROW=per_row,
                 STORE_LSE=store is not None, DOT_PREC=dot_prec)
    _check_interpreter(interpret)
    if AUTOTUNE and config is None and not interpret and q.is_cuda:
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **flags)
    else:
        cfg = config or default_config(n_q, n_k, block_d, interpret, q.element_size())
        grid = (triton.cdiv(n_q, cfg["BLOCK_M"]), B * H)
        _attn_fwd[grid](*args, **flags, **cfg)
    if store is not None:
        # A block of the probabilities (FLUX: image queries x text keys): views of q, k and the
        # weights at the block's offsets, the log-sum-exp (over all keys) of its query rows.
        q0, q1, k0, k1 = store_span(n_q, n_k, store_queries, store_keys)
        qs, ks = q[:, :, q0:q1], k[:, :, k0:k1]  # [B, H, nq, D], [B, H, nk, D]
        ws = token_weights[:, k0:k1] if token_weights is not None else dummy
        lse_s = lse if (q0, q1) == (0, n_q) else lse[:, :, q0:q1].contiguous()  # [B, H, nq]
        m_q, m_k = q1 - q0, k1 - k0
        cfg = map_config(m_k, block_d, interpret)
        grid = (triton.cdiv(m_q, cfg["BLOCK_M"]), triton.cdiv(m_k, cfg["BLOCK_N"]), B)
        _attn_map[grid](qs, ks, args[4], args[5], ws, lse_s, store,
                        *qs.stride(), *ks.stride(), *s_w, *store.stride(), scale, H, m_q, m_k,
                        HEAD_DIM=D, BLOCK_D=block_d, HAS_QF=q_from is not None, HAS_KF=k_from is not None,
                        HAS_W=token_weights is not None, DOT_PREC=dot_prec, **cfg)
    return out


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _check_interpreter(interpret):
    """Check that the kernels were built in the flavour the call needs.

    ``triton.jit`` (and triton.language's own helpers) pick interpreter vs. compiler
    once, when triton is imported, so TRITON_INTERPRET=1 must be in the environment
    before the first ``import triton`` of the process (diffusers imports it early).
    """
    from triton.runtime.interpreter import InterpretedFunction
    built_for_interpreter = isinstance(_attn_fwd, InterpretedFunction)
    if interpret and not built_for_interpreter:
        raise RuntimeError(
            "kernels.attention: TRITON_INTERPRET=1 was set after triton was imported, so the Triton "
            "interpreter cannot run; export TRITON_INTERPRET=1 before starting Python "
            "(or unset it to use the torch CPU path)")


LAST_PATH = None  # "triton", "torch" or "torch-autograd": which implementation the last call used (for tests)


def attention(q, k, v, *, scale=None, q_from=None, k_from=None, v_from=None, token_weights=None,
              store=None, ip=None, out=None, store_rows=None, store_queries=None, store_keys=None):
    """Attention over [B, H, N, D] tensors with injection, reweighting, map store and IP-Adapter.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D]; returns [B, H, Nq, D] in q's dtype.
    q_from/k_from/v_from: int [B], row b uses q[q_from[b]] etc.  token_weights: [B, Nk]
    multiplies probabilities.  store: [B, Nq, Nk] fp16/fp32 buffer, receives the head-mean
    probabilities (Nk <= 512); ``store_queries`` / ``store_keys`` (start, stop) store only that
    block of them (FLUX's image queries x text keys; store is then [B, nq, nk]); ``store_rows`` ((start, stop), ...) says which rows' maps are
    wanted (None: all; the others may skip the explicit path).  ip: (k_img, v_img, scale)
    adds scale·softmax(q k_imgᵀ)v_img.
    ``out`` (internal): preallocated [B, H, Nq, D] output, any strides.
    """
    global LAST_PATH
    span = dict(store_queries=store_queries, store_keys=store_keys)
    check_inputs(q, k, v, scale=scale, q_from=q_from, k_from=k_from, v_from=v_from,
                 token_weights=token_weights, store=store, ip=ip, out=out, store_rows=store_rows, **span)
    if needs_grad(q, k, v, token_weights, ip):  # the Triton kernel has no backward: the differentiable torch path
        LAST_PATH = "torch-autograd"
        return attention_torch(q, k, v, scale=scale, q_from=q_from, k_from=k_from, v_from=v_from,
                               token_weights=token_weights, store=store, ip=ip, out=out, store_rows=store_rows, **span)
    if q.is_cuda or _interpreting():
        LAST_PATH = "triton"
        return attention_triton(q, k, v, scale=scale, q_from=q_from, k_from=k_from, v_from=v_from,
                                token_weights=token_weights, store=store, ip=ip, out=out, store_rows=store_rows, **span)
    LAST_PATH = "torch"
    return attention_torch(q, k, v, scale=scale, q_from=q_from, k_from=k_from, v_from=v_from,
                           token_weights=token_weights, store=store, ip=ip, out=out, store_rows=store_rows, **span)
