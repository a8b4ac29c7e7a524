"""Fused Triton attention that can inject rows, reweight keys and store maps.

One forward kernel computes ``softmax(q kᵀ · scale) v`` with the online softmax
of FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", arXiv:2307.08691): per query block it streams
key blocks, keeps a running row max ``m`` and row sum ``l`` in fp32 and rescales
the accumulator, so no Nq×Nk matrix ever exists in memory.  On top of that:

* inject   -- row b reads q/k/v of rows ``q_from[b]``/``k_from[b]``/``v_from[b]``
              by offsetting the batch pointer with the loaded index (no copies);
* reweight -- probabilities are multiplied by ``token_weights[b]`` before they
              meet v (the one-pass store scales v's rows instead: p·w @ v = p @ (w·v));
              the softmax denominator stays unweighted (no renormalising);
* classes  -- ``key_class[b]`` / ``query_class[b]``: a query reads only the keys of its
              class (MasaCtrl's mask-guided reads; -1 or an absent class reads every key);
* ip       -- a second online-softmax accumulator over IP-Adapter image keys,
              added as ``ip_scale · softmax(q k_imgᵀ) v_img`` in the same pass;
* store    -- in the same launch, with one program per (row, query tile) running every head
              in a fixed order and the head mean summed in registers: no second kernel, no
              atomics, bit-reproducible.  When every key fits one tile (SD's 77-token prompt
              as 64 + 16 keys, head dims <= 64, no IP-Adapter: ``configs.one_tile``) the
              softmax is exact in **one pass**: each head's probabilities are added to the
              sum as they are computed, before they meet v.  Otherwise (FLUX's text block
              inside 4608 keys; D = 80 / 160, where one pass spills) **two phases**: phase 1
              computes each head's output and its rows' log-sum-exp (a [B, H, Nq] scratch),
              phase 2 walks the stored keys in 32-wide tiles, recomputes ``q kᵀ`` there and
              sums the exact probabilities exp2(s - lse) over heads.

Layout: q/k/v are read as views of the projections' [B, N, H·D] activations and the
output is written straight into a [B, N, H·D] buffer (returned as its [B, H, N, D]
view), so the out-projection needs no transpose copy.  Strides are passed in units of
``SU`` = 8 elements, so the compiler can prove 16-byte alignment of every row even when
a stride (the head stride D = 40) is not a multiple of 16, and emits vector loads/stores.

Head dims that are not powers of two are split into two power-of-two pieces
(40 = 32 + 8→16, 80 = 64 + 16, 96 = 64 + 32, 160 = 128 + 32) instead of one padded
tile: at most 16.7% of the tensor-core work is padding (37.5% with 40→64 etc.).

CPU tensors use the torch path in ``reference.py`` unless ``TRITON_INTERPRET=1`` is set
at call time; then the kernel runs in Triton's interpreter, which requires the variable
to be set before triton is imported (see ``_check_interpreter``).  Note
``kernels.attention`` is this module's ``attention`` function; reach the module itself
via ``sys.modules["kernels.attention"]``.
"""
import os

import torch
import triton
import triton.language as tl

from . import configs, dispatch
from .reference import attention_torch, check_inputs, needs_grad, store_span


@triton.jit
def _scores(q1, q2, Kh, s_kn, offs_n, n_mask, HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
            MASK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Raw q kᵀ for one key tile: [BLOCK_M, BLOCK_N] from the head dim's one or two pieces."""
    d1 = tl.arange(0, D1)
    if MASK_N:
        kt = tl.load(Kh + offs_n[None, :] * s_kn + d1[:, None], mask=n_mask[None, :], other=0.0)  # [D1, BN]
    else:
        kt = tl.load(Kh + offs_n[None, :] * s_kn + d1[:, None])
    qk = tl.dot(q1, kt, input_precision=DOT_PREC)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        mask = d2[:, None] < HEAD_DIM  # all true unless D2 is padded (40 = 32 + 8 of 16)
        if MASK_N:
            mask = mask & n_mask[None, :]
        k2 = tl.load(Kh + offs_n[None, :] * s_kn + d2[:, None], mask=mask, other=0.0)  # [D2, BN]
        qk += tl.dot(q2, k2, input_precision=DOT_PREC)
    return qk


@triton.jit
def _values(acc1, acc2, p, Vh, s_vn, offs_n, n_mask, HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
            MASK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc += p @ v for one key tile, per head-dim piece."""
    return _values_w(acc1, acc2, p, Vh, s_vn, offs_n, n_mask, n_mask, HEAD_DIM, D1, D2, MASK_N, False, DOT_PREC)


@triton.jit
def _values_w(acc1, acc2, p, Vh, s_vn, offs_n, n_mask, w, HEAD_DIM: tl.constexpr, D1: tl.constexpr,
              D2: tl.constexpr, MASK_N: tl.constexpr, SCALE_V: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc += p @ v for one key tile, per head-dim piece; with SCALE_V, v's rows times w [BN]."""
    d1 = tl.arange(0, D1)
    if MASK_N:
        v1 = tl.load(Vh + offs_n[:, None] * s_vn + d1[None, :], mask=n_mask[:, None], other=0.0)  # [BN, D1]
    else:
        v1 = tl.load(Vh + offs_n[:, None] * s_vn + d1[None, :])
    if SCALE_V:
        v1 = (v1.to(tl.float32) * w[:, None]).to(v1.dtype)
    acc1 = tl.dot(p.to(v1.dtype), v1, acc1, input_precision=DOT_PREC)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        mask = d2[None, :] < HEAD_DIM
        if MASK_N:
            mask = mask & n_mask[:, None]
        v2 = tl.load(Vh + offs_n[:, None] * s_vn + d2[None, :], mask=mask, other=0.0)  # [BN, D2]
        if SCALE_V:
            v2 = (v2.to(tl.float32) * w[:, None]).to(v2.dtype)
        acc2 = tl.dot(p.to(v2.dtype), v2, acc2, input_precision=DOT_PREC)
    return acc1, acc2


@triton.jit
def _stream(acc1, acc2, l_i, m_i, q1, q2, Kh, Vh, Wb, s_kn, s_vn, s_wn, qk_scale, start, end, qc, KCb,
            HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_W: tl.constexpr, MASK_N: tl.constexpr, HAS_CLS: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over keys [start, end): full tiles unmasked (MASK_N=False), or the ragged tail.
    With HAS_CLS a query of class qc >= 0 only reads keys of that class (``KCb``: [Nk] int8)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        qk = _scores(q1, q2, Kh, s_kn, offs_n, n_mask, HEAD_DIM, D1, D2, MASK_N, DOT_PREC)  # [BM, BN]
        if MASK_N:
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        if HAS_CLS:
            kc = tl.load(KCb + offs_n, mask=n_mask, other=-2).to(tl.int32)  # [BN]
            qk = tl.where((qc[:, None] < 0) | (kc[None, :] == qc[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        if HAS_CLS:  # a query may have met none of its keys yet: exp2(-inf - -inf) would be NaN.
            # Only the exponents use 0 then; the running max stays -inf, so it never floors later tiles.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])  # one FMA per score (log2 units)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)  # denominator uses unweighted p
        if HAS_W:
            w = tl.load(Wb + offs_n * s_wn, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
            p = p * w[None, :]
        acc1 = acc1 * alpha[:, None]
        if D2 > 0:
            acc2 = acc2 * alpha[:, None]
        acc1, acc2 = _values(acc1, acc2, p, Vh, s_vn, offs_n, n_mask, HEAD_DIM, D1, D2, MASK_N, DOT_PREC)
        m_i = m_new
    return acc1, acc2, l_i, m_i


@triton.jit
def _stream_range(acc1, acc2, l_i, m_i, q1, q2, Kh, Vh, Wb, s_kn, s_vn, s_wn, qk_scale, start, end, qc, KCb,
                  HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_W: tl.constexpr, HAS_CLS: tl.constexpr, DOT_PREC: tl.constexpr):
    full = start + ((end - start) // BLOCK_N) * BLOCK_N
    acc1, acc2, l_i, m_i = _stream(acc1, acc2, l_i, m_i, q1, q2, Kh, Vh, Wb, s_kn, s_vn, s_wn, qk_scale, start,
                                   full, qc, KCb, HEAD_DIM, D1, D2, BLOCK_N, HAS_W, False, HAS_CLS, DOT_PREC)
    return _stream(acc1, acc2, l_i, m_i, q1, q2, Kh, Vh, Wb, s_kn, s_vn, s_wn, qk_scale, full, end, qc, KCb,
                   HEAD_DIM, D1, D2, BLOCK_N, HAS_W, True, HAS_CLS, DOT_PREC)


@triton.jit
def _query_classes(QCb, KCb, offs_m, m_mask, N_K, BLOCK_K: tl.constexpr):
    """The rows' query classes [BM] as read: a class no key of the row has becomes -1 (every key)."""
    qc = tl.load(QCb + offs_m, mask=m_mask, other=-1).to(tl.int32)  # [BM]
    has0 = 0
    has1 = 0
    for k0 in range(0, N_K, BLOCK_K):  # N_K bytes, once per program
        offs = k0 + tl.arange(0, BLOCK_K)
        kc = tl.load(KCb + offs, mask=offs < N_K, other=-1).to(tl.int32)
        has0 = tl.maximum(has0, tl.max((kc == 0).to(tl.int32), 0))
        has1 = tl.maximum(has1, tl.max((kc == 1).to(tl.int32), 0))
    # only a class the row has keeps its value: -1, absent classes and invalid values read every key
    return tl.where(((qc == 0) & (has0 > 0)) | ((qc == 1) & (has1 > 0)), qc, -1)


@triton.jit
def _load_q(Qb, hq, s_qn, offs_m, m_mask, HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """One head's query tile as its head-dim pieces: [BM, D1] and [BM, D2] (q1 again when D2 = 0)."""
    d1 = tl.arange(0, D1)
    q1 = tl.load(Qb + (offs_m * s_qn)[:, None] + (hq + d1)[None, :], mask=m_mask[:, None], other=0.0)  # [BM, D1]
    q2 = q1
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        q2 = tl.load(Qb + (offs_m * s_qn)[:, None] + (hq + d2)[None, :],
                     mask=m_mask[:, None] & (d2[None, :] < HEAD_DIM), other=0.0)  # [BM, D2]
    return q1, q2


@triton.jit
def _finish(acc1, acc2, l_i, q1, q2, KIh, VIh, Ob, ho, s_on, s_kin, s_vin, qk_scale, ip_s, offs_m, m_mask, N_IP,
            HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_IP: tl.constexpr, HAS_IP: tl.constexpr, DOT_PREC: tl.constexpr):
    """Normalise one head's accumulators, add the IP-Adapter term, write the output tile."""
    inv_l = 1.0 / l_i
    out1 = acc1 * inv_l[:, None]  # [BM, D1]
    out2 = acc2 * inv_l[:, None]
    if HAS_IP:  # decoupled cross-attention: its own max/sum/accumulator, same q tile
        i1 = tl.zeros([BLOCK_M, D1], tl.float32)
        i2 = tl.zeros_like(acc2)
        l2 = tl.zeros([BLOCK_M], tl.float32)
        m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        # no weights and no classes on image keys: KIh / m_mask only fill those unused slots
        i1, i2, l2, m2 = _stream(i1, i2, l2, m2, q1, q2, KIh, VIh, KIh, s_kin, s_vin, 0, qk_scale, 0, N_IP,
                                 m_mask, KIh, HEAD_DIM, D1, D2, BLOCK_IP, False, True, False, DOT_PREC)
        out1 += (ip_s / l2)[:, None] * i1
        if D2 > 0:
            out2 += (ip_s / l2)[:, None] * i2
    d1 = tl.arange(0, D1)
    tl.store(Ob + (offs_m * s_on)[:, None] + (ho + d1)[None, :], out1.to(Ob.dtype.element_ty), mask=m_mask[:, None])
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        tl.store(Ob + (offs_m * s_on)[:, None] + (ho + d2)[None, :], out2.to(Ob.dtype.element_ty),
                 mask=m_mask[:, None] & (d2[None, :] < HEAD_DIM))


@triton.jit
def _accumulators(BLOCK_M: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
    acc2 = tl.zeros([BLOCK_M, D1], tl.float32)  # placeholder; only used when D2 > 0
    if D2 > 0:
        acc2 = tl.zeros([BLOCK_M, D2], tl.float32)
    return acc1, acc2


@triton.jit
def _head(Qb, hq, Kh, Vh, Ob, ho, Wb, KIh, VIh, QCb, KCb, s_qn, s_kn, s_vn, s_on, s_wn, s_kin, s_vin, qk_scale,
          ip_s, pid_m, N_Q, N_K, N_IP,
          HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_IP: tl.constexpr, HAS_W: tl.constexpr, HAS_IP: tl.constexpr,
          HAS_CLS: tl.constexpr, DOT_PREC: tl.constexpr):
    """One (row, head, query tile), streaming the keys: writes the output, returns the rows'
    log2-sum-exp [BLOCK_M].  q and o are addressed as base + (row offset, head offset + d) so the
    store variant's head loop can pass the head as an offset."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N_Q
    q1, q2 = _load_q(Qb, hq, s_qn, offs_m, m_mask, HEAD_DIM, D1, D2)
    qc = offs_m  # placeholder; used only with HAS_CLS
    if HAS_CLS:
        qc = _query_classes(QCb, KCb, offs_m, m_mask, N_K, 1024)
    acc1, acc2 = _accumulators(BLOCK_M, D1, D2)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1, acc2, l_i, m_i = _stream_range(acc1, acc2, l_i, m_i, q1, q2, Kh, Vh, Wb, s_kn, s_vn, s_wn, qk_scale,
                                         0, N_K, qc, KCb, HEAD_DIM, D1, D2, BLOCK_N, HAS_W, HAS_CLS, DOT_PREC)
    _finish(acc1, acc2, l_i, q1, q2, KIh, VIh, Ob, ho, s_on, s_kin, s_vin, qk_scale, ip_s, offs_m, m_mask, N_IP,
            HEAD_DIM, D1, D2, BLOCK_M, BLOCK_IP, HAS_IP, DOT_PREC)
    return m_i + tl.math.log2(l_i)


@triton.jit
def _key_piece(q1, q2, Kh, s_kn, start, N_K, qk_scale, HEAD_DIM: tl.constexpr, D1: tl.constexpr,
               D2: tl.constexpr, WIDTH: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scaled scores (log2 units) of keys [start, start + WIDTH): [BM, WIDTH], -inf past N_K.
    Padded columns read the last key again instead of masking the [D, WIDTH] loads (fewer live
    registers); their scores are -inf, so they add nothing to the softmax or to p @ v."""
    offs_n = start + tl.arange(0, WIDTH)
    rows = tl.minimum(offs_n, N_K - 1)
    qk = _scores(q1, q2, Kh, s_kn, rows, rows, HEAD_DIM, D1, D2, False, DOT_PREC)
    return tl.where((offs_n < N_K)[None, :], qk * qk_scale, float("-inf")), rows


@triton.jit
def _head_one_tile(total1, total2, w1, w2, Qb, hq, Kh, Vh, Ob, ho, s_qn, s_kn, s_vn, s_on, qk_scale, offs_m,
                   m_mask, N_K, HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_M: tl.constexpr,
                   KT1: tl.constexpr, KT2: tl.constexpr, HAS_W: tl.constexpr, DOT_PREC: tl.constexpr):
    """One (row, head, query tile) when every key fits one tile: the softmax is exact in one pass.
    The keys come in two power-of-two pieces KT1 + KT2 (77 = 64 + 16, as the head dims), so the
    tile's padding stays small and no [BM, 128] tensor is live.  Writes the output and returns
    ``total1/2`` plus this head's probabilities, added before p meets v."""
    q1, q2 = _load_q(Qb, hq, s_qn, offs_m, m_mask, HEAD_DIM, D1, D2)
    s1, rows1 = _key_piece(q1, q2, Kh, s_kn, 0, N_K, qk_scale, HEAD_DIM, D1, D2, KT1, DOT_PREC)  # [BM, KT1]
    m_i = tl.max(s1, 1)
    if KT2 > 0:
        s2, rows2 = _key_piece(q1, q2, Kh, s_kn, KT1, N_K, qk_scale, HEAD_DIM, D1, D2, KT2, DOT_PREC)  # [BM, KT2]
        m_i = tl.maximum(m_i, tl.max(s2, 1))
    p1 = tl.math.exp2(s1 - m_i[:, None])
    l_i = tl.sum(p1, 1)  # the denominator uses unweighted p
    if KT2 > 0:
        p2 = tl.math.exp2(s2 - m_i[:, None])
        l_i += tl.sum(p2, 1)
    inv_l = 1.0 / l_i
    total1 += p1 * inv_l[:, None]
    acc1, acc2 = _accumulators(BLOCK_M, D1, D2)
    # token weights scale v's rows (p·w @ v = p @ (w·v); w·v rounded once to v's dtype, as p·w
    # would be): no weighted copy of p beside the totals
    acc1, acc2 = _values_w(acc1, acc2, p1, Vh, s_vn, rows1, rows1, w1, HEAD_DIM, D1, D2, False, HAS_W, DOT_PREC)
    if KT2 > 0:
        total2 += p2 * inv_l[:, None]
        acc1, acc2 = _values_w(acc1, acc2, p2, Vh, s_vn, rows2, rows2, w2, HEAD_DIM, D1, D2, False, HAS_W,
                               DOT_PREC)
    # no IP-Adapter keys here (configs.one_tile admits none): Kh / 0 fill _finish's unused IP slots
    _finish(acc1, acc2, l_i, q1, q2, Kh, Kh, Ob, ho, s_on, 0, 0, qk_scale, 0.0, offs_m, m_mask, 0,
            HEAD_DIM, D1, D2, BLOCK_M, 16, False, DOT_PREC)
    return total1, total2


@triton.jit
def _key_weights(Wb, s_wn, start, N_K, WIDTH: tl.constexpr, HAS_W: tl.constexpr):
    """Token weights of keys [start, start + WIDTH) as fp32 (0 past N_K; ones without weights)."""
    offs = start + tl.arange(0, WIDTH)
    w = tl.full([WIDTH], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(Wb + offs * s_wn, mask=offs < N_K, other=0.0).to(tl.float32)
    return w


@triton.jit
def _store_map(S, b, s_sb, s_sq, total, w, offs_m, keep, start, H, Q0, K0, K_END, WIDTH: tl.constexpr,
               HAS_W: tl.constexpr):
    """Write the head mean of keys [start, start + WIDTH) ∩ [K0, K_END) (times the keys' weights,
    which factor out of the mean) into the map rows of ``keep``."""
    offs_n = start + tl.arange(0, WIDTH)
    total = total / H
    if HAS_W:
        total = total * w[None, :]
    tl.store(S + b * s_sb + (offs_m - Q0)[:, None] * s_sq + (offs_n - K0)[None, :], total.to(S.dtype.element_ty),
             mask=keep[:, None] & ((offs_n >= K0) & (offs_n < K_END))[None, :])


@triton.jit
def _attn_fwd(Q, K, V, O, QF, KF, VF, W, KI, VI, IPS, S, LSE, QC, KC,
              s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
              s_kib, s_kih, s_kin, s_vib, s_vih, s_vin, s_wb, s_wn, s_sb, s_sq, s_qcb, s_kcb,
              sm_scale, ip_scale, H, N_Q, N_K, N_IP, Q0, Q1, K0, K1,
              HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, SU: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_IP: tl.constexpr, BLOCK_S: tl.constexpr,
              HAS_QF: tl.constexpr, HAS_KF: tl.constexpr, HAS_VF: tl.constexpr, HAS_W: tl.constexpr,
              HAS_IP: tl.constexpr, IP_PER_ROW: tl.constexpr, STORE: tl.constexpr, KT1: tl.constexpr,
              KT2: tl.constexpr, HAS_CLS: tl.constexpr, DOT_PREC: tl.constexpr):
    # Grid: (query tiles, B * H); with STORE (query tiles, B) and the heads looped here.
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    if STORE:
        b = pid.to(tl.int64)
    else:
        b = (pid // H).to(tl.int64)
    # Injection: pick the source row of each operand, then read it in place.
    qb = b
    kb = b
    vb = b
    if HAS_QF:
        qb = tl.load(QF + b).to(tl.int64)
    if HAS_KF:
        kb = tl.load(KF + b).to(tl.int64)
    if HAS_VF:
        vb = tl.load(VF + b).to(tl.int64)
    ip_s = ip_scale
    if IP_PER_ROW:
        ip_s = tl.load(IPS + b).to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2 e)
    # Strides arrive divided by SU, so every row offset is provably a multiple of SU elements.
    Qb = Q + qb * (s_qb * SU)
    Kb = K + kb * (s_kb * SU)
    Vb = V + vb * (s_vb * SU)
    Ob = O + b * (s_ob * SU)
    KIb = KI + b * (s_kib * SU)
    VIb = VI + b * (s_vib * SU)
    Wb = W + b * s_wb
    QCb = QC + b * s_qcb  # classes belong to the reading row b (its mask of the keys it reads)
    KCb = KC + b * s_kcb
    if STORE and KT1 > 0:
        # Every key fits one tile (SD's 77-token prompt): the softmax is exact in one pass, so each
        # head's probabilities are summed in registers in a fixed head order as they are computed
        # and the map is written once: no scratch, no recomputation, no atomics.
        KT2_: tl.constexpr = max(KT2, 16)  # a placeholder width when KT2 = 0
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N_Q
        w1 = _key_weights(Wb, s_wn, 0, N_K, KT1, HAS_W)  # [KT1]
        w2 = _key_weights(Wb, s_wn, KT1, N_K, KT2_, HAS_W)  # [KT2]; unused when KT2 = 0
        total1 = tl.zeros([BLOCK_M, KT1], tl.float32)
        total2 = tl.zeros([BLOCK_M, KT2_], tl.float32)
        for h in range(0, H):
            total1, total2 = _head_one_tile(
                total1, total2, w1, w2, Qb, h * (s_qh * SU), Kb + h * (s_kh * SU), Vb + h * (s_vh * SU), Ob,
                h * (s_oh * SU), s_qn * SU, s_kn * SU, s_vn * SU, s_on * SU, qk_scale, offs_m, m_mask, N_K,
                HEAD_DIM, D1, D2, BLOCK_M, KT1, KT2, HAS_W, DOT_PREC)
        keep = (offs_m >= Q0) & (offs_m < Q1)
        _store_map(S, b, s_sb, s_sq, total1, w1, offs_m, keep, 0, H, Q0, K0, K1, KT1, HAS_W)
        if KT2 > 0:
            _store_map(S, b, s_sb, s_sq, total2, w2, offs_m, keep, KT1, H, Q0, K0, K1, KT2_, HAS_W)
    elif STORE:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N_Q
        # Phase 1: every head in turn, its output and its rows' log-sum-exp (a tiny scratch).
        for h in range(0, H):
            lse = _head(Qb, h * (s_qh * SU), Kb + h * (s_kh * SU), Vb + h * (s_vh * SU), Ob, h * (s_oh * SU),
                        Wb, KIb + h * (s_kih * SU), VIb + h * (s_vih * SU), QCb, KCb, s_qn * SU, s_kn * SU,
                        s_vn * SU, s_on * SU, s_wn, s_kin * SU, s_vin * SU, qk_scale, ip_s, pid_m, N_Q, N_K, N_IP,
                        HEAD_DIM, D1, D2, BLOCK_M, BLOCK_N, BLOCK_IP, HAS_W, HAS_IP, False, DOT_PREC)
            tl.store(LSE + (b * H + h) * N_Q + offs_m, lse, mask=m_mask)
        tl.debug_barrier()  # the scratch rows were written by other threads of this program
        # Phase 2: per stored key tile, the exact probabilities exp2(s - lse) summed over the heads
        # in registers in a fixed order, written once: no second kernel, no atomics.
        d1 = tl.arange(0, D1)
        keep = (offs_m >= Q0) & (offs_m < Q1)
        k_end = K1
        if (pid_m * BLOCK_M >= Q1) | ((pid_m + 1) * BLOCK_M <= Q0):
            k_end = K0  # no stored query row in this tile (FLUX's text queries): skip phase 2
        for k0 in range(K0, k_end, BLOCK_S):
            offs_s = k0 + tl.arange(0, BLOCK_S)
            # Clamped key rows instead of a load mask: rows past K1 repeat the last key and are
            # never written (the store's mask), so the loads need no [BS, D] mask.
            rows_k = tl.minimum(offs_s, K1 - 1) * (s_kn * SU)  # [BS]
            total = tl.zeros([BLOCK_M, BLOCK_S], tl.float32)
            for h in range(0, H):
                hq = h * (s_qh * SU)
                hk = h * (s_kh * SU)
                q1 = tl.load(Qb + (offs_m * (s_qn * SU))[:, None] + (hq + d1)[None, :], mask=m_mask[:, None],
                             other=0.0)  # [BM, D1]
                kt = tl.load(Kb + rows_k[None, :] + (hk + d1)[:, None])  # [D1, BS]
                qk = tl.dot(q1, kt, input_precision=DOT_PREC)
                if D2 > 0:
                    d2 = D1 + tl.arange(0, D2)
                    q2 = tl.load(Qb + (offs_m * (s_qn * SU))[:, None] + (hq + d2)[None, :],
                                 mask=m_mask[:, None] & (d2[None, :] < HEAD_DIM), other=0.0)  # [BM, D2]
                    k2 = tl.load(Kb + rows_k[None, :] + (hk + d2)[:, None], mask=(d2 < HEAD_DIM)[:, None],
                                 other=0.0)  # [D2, BS]
                    qk += tl.dot(q2, k2, input_precision=DOT_PREC)
                lse = tl.load(LSE + (b * H + h) * N_Q + offs_m, mask=m_mask, other=0.0)  # [BM]
                total += tl.math.exp2(qk * qk_scale - lse[:, None])
            w = _key_weights(Wb, s_wn, k0, N_K, BLOCK_S, HAS_W)  # [BS]
            _store_map(S, b, s_sb, s_sq, total, w, offs_m, keep, k0, H, Q0, K0, K1, BLOCK_S, HAS_W)
    else:
        h = (pid % H).to(tl.int64)
        _head(Qb, h * (s_qh * SU), Kb + h * (s_kh * SU), Vb + h * (s_vh * SU), Ob, h * (s_oh * SU),
              Wb, KIb + h * (s_kih * SU), VIb + h * (s_vih * SU), QCb, KCb, s_qn * SU, s_kn * SU, s_vn * SU,
              s_on * SU, s_wn, s_kin * SU, s_vin * SU, qk_scale, ip_s, pid_m, N_Q, N_K, N_IP,
              HEAD_DIM, D1, D2, BLOCK_M, BLOCK_N, BLOCK_IP, HAS_W, HAS_IP, HAS_CLS, DOT_PREC)


_attn_fwd_tuned = triton.autotune(
    configs=configs.autotune_configs(),
    key=["N_Q", "N_K", "N_IP", "H", "HEAD_DIM", "HAS_W", "HAS_IP", "STORE", "BLOCK_S", "KT1", "KT2", "HAS_CLS"],
    prune_configs_by={"early_config_prune": configs.prune})(_attn_fwd)


AUTOTUNE = os.environ.get("OVERPAINT_AUTOTUNE", "1") != "0"  # off for CUDA-graph capture


def engine_layout(B, H, N, D, *, dtype, device):
    """A [B, H, N, D] view of a fresh [B, N, H·D] buffer: what the out-projection reads without a copy."""
    return torch.empty((B, N, H, D), dtype=dtype, device=device).transpose(1, 2)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_args(q, k, v, *, scale=None, q_from=None, k_from=None, v_from=None, token_weights=None,
                store=None, ip=None, out=None, store_queries=None, store_keys=None, key_class=None, query_class=None):
    """(args, constexprs, out): the kernel's arguments for one call (also used by ``kernels.check``,
    which specialises them exactly as the JIT launcher would)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    if out is None:
        out = engine_layout(B, H, n_q, D, dtype=q.dtype, device=q.device)  # [B, H, Nq, D] view of [B, Nq, H·D]
    dummy = q  # stands in for absent optional pointers; never dereferenced
    ki, vi, ips_t, ip_scale, n_ip, per_row = dummy, dummy, dummy, 0.0, 0, False
    if ip is not None:
        ki, vi, ip_s = ip
        ki, vi = _unit_last(ki), _unit_last(vi)
        n_ip = ki.shape[2]
        if isinstance(ip_s, torch.Tensor):
            ips_t, per_row = ip_s, True
        else:
            ip_scale = float(ip_s)
    w = token_weights if token_weights is not None else dummy
    s_w = token_weights.stride() if token_weights is not None else (0, 0)
    q0, q1, k0, k1 = store_span(n_q, n_k, store_queries, store_keys)
    one = configs.store_pieces(q, n_k, ip is not None) if store is not None else (0, 0)  # (0, 0): two-phase
    two_phase = store is not None and not one[0]
    lse = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32) if two_phase else dummy  # phase 1 -> 2
    s_s = (store.stride(0), store.stride(1)) if store is not None else (0, 0)
    qc = kc = dummy
    assert store is None or key_class is None, "kernels.attention: key_class cannot be combined with store"
    if key_class is not None:  # int8 rows of classes, unit element stride (B·N bytes: a cheap copy if needed)
        # wider dtypes clamped first so out-of-range values stay invalid (read every key) instead of
        # wrapping; the engine's int8 classes pass as they are (no copy per call)
        qc, kc = (t if t.dtype == torch.int8 else t.clamp(-2, 2).to(torch.int8) for t in (query_class, key_class))
        qc, kc = qc.contiguous(), kc.contiguous()
    tensors = (q, k, v, out, ki, vi)
    strided = [s for t in tensors for s in t.stride()[:3]]
    su = 8 if all(s % 8 == 0 for s in strided) else 1  # every engine view: D and H·D are multiples of 8
    strides = [s // su for t in tensors for s in t.stride()[:3]]
    args = (q, k, v, out,
            q_from if q_from is not None else dummy, k_from if k_from is not None else dummy,
            v_from if v_from is not None else dummy, w, ki, vi, ips_t, store if store is not None else dummy, lse,
            qc, kc, *strides, *s_w, *s_s, qc.stride(0) if key_class is not None else 0,
            kc.stride(0) if key_class is not None else 0,
            D ** -0.5 if scale is None else float(scale), ip_scale, H, n_q, n_k, n_ip, q0, q1, k0, k1)
    d1, d2 = configs.split_head_dim(D)
    flags = dict(HEAD_DIM=D, D1=d1, D2=d2, SU=su,
                 BLOCK_IP=max(16, min(64, triton.next_power_of_2(max(n_ip, 1)))),
                 BLOCK_S=min(configs.STORE_TILE, max(16, triton.next_power_of_2(k1 - k0))) if store is not None else 16,
                 HAS_QF=q_from is not None, HAS_KF=k_from is not None, HAS_VF=v_from is not None,
                 HAS_W=token_weights is not None, HAS_IP=ip is not None, IP_PER_ROW=per_row,
                 STORE=store is not None, KT1=one[0], KT2=one[1], HAS_CLS=key_class is not None,
                 DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    return args, flags, out


def attention_triton(q, k, v, *, scale=None, q_from=None, k_from=None, v_from=None, token_weights=None,
                     store=None, ip=None, out=None, config=None, store_rows=None, store_queries=None, store_keys=None,
                     key_class=None, query_class=None):
    """Launch the Triton kernel.  Inputs must already be validated (see ``attention``).
    ``store_rows`` is accepted and ignored: the kernel stores every row's map in the same pass,
    and no row's output depends on whether its maps are stored."""
    B, H, n_q, D = q.shape
    given, given_store = out, store
    if out is not None and out.stride(-1) != 1:
        out = None  # computed in the engine layout, copied into the caller's buffer below
    if store is not None and store.stride(-1) != 1:
        store = torch.empty(store.shape, dtype=store.dtype, device=store.device)  # the kernel writes rows of keys
    args, flags, res = launch_args(q, k, v, scale=scale, q_from=q_from, k_from=k_from, v_from=v_from,
                                   token_weights=token_weights, store=store, ip=ip, out=out,
                                   store_queries=store_queries, store_keys=store_keys, key_class=key_class,
                                   query_class=query_class)
    global LAST_FLAGS
    LAST_FLAGS = flags
    interpret = _interpreting()
    _check_interpreter(interpret)
    rows = B if store is not None else B * H  # the store variant loops over heads in one program
    if AUTOTUNE and config is None and not interpret and q.is_cuda:
        _attn_fwd_tuned[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), rows)](*args, **flags)
    else:
        cfg = config or configs.default_config(q, k.shape[2], flags, interpret)
        _attn_fwd[(triton.cdiv(n_q, cfg["BLOCK_M"]), rows)](*args, **flags, **cfg)
    if given_store is not None and store is not given_store:
        given_store.copy_(store)
    if given is not None and res is not given:
        given.copy_(res)
        return given
    return res


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


LAST_PATH = None  # "triton", "sdpa-<backend>", "torch" or "torch-autograd": the last call's path (for tests)
LAST_FLAGS = None  # the last Triton launch's constexpr flags (tests and the benchmark read its store path)


def attention(q, k, v, *, scale=None, q_from=None, k_from=None, v_from=None, token_weights=None,
              store=None, ip=None, out=None, store_rows=None, store_queries=None, store_keys=None,
              key_class=None, query_class=None):
    """Attention over [B, H, N, D] tensors with injection, reweighting, map store and IP-Adapter.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D]; returns [B, H, Nq, D] in q's dtype (on CUDA a view of
    a [B, Nq, H·D] buffer: ``out.transpose(1, 2).reshape(B, Nq, H * D)`` is free).
    q_from/k_from/v_from: int [B], row b uses q[q_from[b]] etc.  token_weights: [B, Nk]
    multiplies probabilities.  store: [B, Nq, Nk] fp16/fp32 buffer, receives the head-mean
    probabilities (Nk <= 512); ``store_queries`` / ``store_keys`` (start, stop) store only that
    block of them (FLUX's image queries x text keys; store is then [B, nq, nk]); ``store_rows``
    ((start, stop), ...) says which rows' maps are wanted (None: all; the others may skip the
    explicit path).  ip: (k_img, v_img, scale) adds scale·softmax(q k_imgᵀ)v_img.
    key_class [B, Nk] (0 / 1) and query_class [B, Nq] (-1 / 0 / 1), integer or bool: query i of
    row b reads only the keys of its class (a class of -1, or one no key of the row has, reads
    every key): MasaCtrl's mask-guided reads in one launch (not with store).
    ``out`` (internal): preallocated [B, H, Nq, D] output, any strides.
    Plain CUDA calls (no instruction) go to the backend measured fastest for the shape on this
    device (``kernels.dispatch``); calls with instructions always run our kernel.
    """
    global LAST_PATH
    span = dict(store_queries=store_queries, store_keys=store_keys, key_class=key_class, query_class=query_class)
    check_inputs(q, k, v, scale=scale, q_from=q_from, k_from=k_from, v_from=v_from,
                 token_weights=token_weights, store=store, ip=ip, out=out, store_rows=store_rows, **span)
    if needs_grad(q, k, v, token_weights, ip):  # the Triton kernel has no backward: the differentiable torch path
        LAST_PATH = "torch-autograd"
        return attention_torch(q, k, v, scale=scale, q_from=q_from, k_from=k_from, v_from=v_from,
                               token_weights=token_weights, store=store, ip=ip, out=out, store_rows=store_rows, **span)
    if q.is_cuda or _interpreting():
        plain = q_from is None and k_from is None and v_from is None and token_weights is None \
            and store is None and ip is None and key_class is None
        backend = dispatch.backend(q, k) if plain and q.is_cuda else "ours"
        if backend != "ours":
            LAST_PATH = f"sdpa-{backend}"
            return dispatch.sdpa(backend, q, k, v, scale=scale, out=out)
        LAST_PATH = "triton"
        return attention_triton(q, k, v, scale=scale, q_from=q_from, k_from=k_from, v_from=v_from,
                                token_weights=token_weights, store=store, ip=ip, out=out, store_rows=store_rows, **span)
    LAST_PATH = "torch"
    return attention_torch(q, k, v, scale=scale, q_from=q_from, k_from=k_from, v_from=v_from,
                           token_weights=token_weights, store=store, ip=ip, out=out, store_rows=store_rows, **span)
