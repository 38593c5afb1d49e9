"""Triton kernels of causal sliding-window attention: forward, dQ, dK/dV (no atomics).

TQ queries over TK keys, query row m at key position Q_OFF + m (a plain batch: Q_OFF = 0, TQ = TK;
a sequence-parallel shard or queries after cached keys: an offset). Query t sees key s when
0 <= t - s <= window, and, with packed documents (PACKED, Q_OFF = 0), s >= first[t], the first token
of t's document (`first` (T,) int, never decreasing). A flash-attention band: a program holds a tile of
BLOCK_M queries of one head and walks only the key tiles that reach into its window (about
(window + BLOCK_M) / BLOCK_N of them), so K/V are read once per query tile, not once per query
as when the window ran on the selected-block kernels. dK/dV: one program per key tile and kv
head walks the query tiles whose window reaches it, for each query head of the group.

Naming: i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ tiles (shape in the comment).
Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, TQ queries, TK keys, D / DV head dims.
"""

import triton
import triton.language as tl

from nsa_core.kernels.online_softmax import online_softmax_step


@triton.jit
def _band(o_pm, o_n, T, window, b_first):
    """[M, N] mask: key o_n (of T keys) within the window of the query at key position o_pm, not
    before its document's first token b_first [M]."""
    dist = o_pm[:, None] - o_n[None, :]
    return (dist >= 0) & (dist <= window) & (o_n < T)[None, :] & (o_n[None, :] >= b_first[:, None])


@triton.jit
def _doc_first(first, o_m, m_m, PACKED: tl.constexpr):
    """[M] first token of each query's document (0 unless PACKED)."""
    if PACKED:
        return tl.load(first + o_m, mask=m_m, other=0).to(tl.int32)
    return tl.zeros_like(o_m)


@triton.jit
def _band_start(first, i_m, Q_OFF, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr):
    """First key tile the query tile i_m reaches: its window, cut at its first query's document start."""
    lo = tl.maximum(Q_OFF + i_m * BLOCK_M - window, 0)
    if PACKED:
        lo = tl.maximum(lo, tl.load(first + i_m * BLOCK_M).to(tl.int32))
    return lo // BLOCK_N * BLOCK_N


@triton.jit
def _key_tile(p_k, p_v, stride_kt, stride_vt, start, T, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys start ... start + BLOCK_N - 1: positions [N], K [N, BLOCK_D], V [N, BLOCK_DV] (zeros past T)."""
    o_n = start + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_n = o_n < T
    b_k = tl.load(p_k + o_n[:, None] * stride_kt + o_d[None, :], mask=m_n[:, None] & (o_d[None, :] < D), other=0.0)
    b_v = tl.load(p_v + o_n[:, None] * stride_vt + o_dv[None, :], mask=m_n[:, None] & (o_dv[None, :] < DV), other=0.0)
    return o_n, b_k, b_v


@triton.jit
def _query_tile(q, stride_qb, stride_qh, stride_qt, T, HQ, G, D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """This program's BLOCK_M queries of one head (grid: (B * HQ, query tiles)): batch, query head,
    its kv head, tile index, rows [M], their mask [M] and Q [M, BLOCK_D] (zeros past T queries)."""
    i_bh, i_m = tl.program_id(0), tl.program_id(1)  # heads fastest: a query tile's heads share K/V in L2
    i_bh = i_bh.to(tl.int64)  # 64-bit: (batch, head) offsets pass 2**31 elements (64 heads x 1M tokens x 128)
    i_b = (i_bh // HQ).to(tl.int64)
    i_h = i_bh % HQ
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < T
    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qt + o_d[None, :],
                  mask=m_m[:, None] & (o_d[None, :] < D), other=0.0)
    return i_b, i_h, i_h // G, i_m, o_m, m_m, b_q


@triton.jit
def sliding_window_fwd_kernel(
    q, k, v, o, lse, first,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    TQ, TK, Q_OFF, HQ, G, window, scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr,
):
    i_b, i_h, i_hk, i_m, o_m, m_m, b_q = _query_tile(q, stride_qb, stride_qh, stride_qt, TQ, HQ, G, D, BLOCK_D, BLOCK_M)
    o_pm = Q_OFF + o_m  # the queries' key positions
    o_dv = tl.arange(0, BLOCK_DV)
    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_first = _doc_first(first, o_m, m_m, PACKED)  # [M]
    lo = _band_start(first, i_m, Q_OFF, window, BLOCK_M, BLOCK_N, PACKED)
    hi = tl.minimum(Q_OFF + (i_m + 1) * BLOCK_M, TK)
    for start in range(lo, hi, BLOCK_N):
        o_n, b_k, b_v = _key_tile(p_k, p_v, stride_kt, stride_vt, start, TK, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale  # [M, N]
        b_s = tl.where(_band(o_pm, o_n, TK, window, b_first), b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_m, b_l, b_acc, b_s, b_v, PRECISION)

    b_l = tl.where(b_l > 0, b_l, 1.0)  # every query sees itself; guards the padding rows only
    p_o = o + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_ot + o_dv[None, :]
    tl.store(p_o, (b_acc / b_l[:, None]).to(o.dtype.element_ty), mask=m_m[:, None] & (o_dv[None, :] < DV))
    tl.store(lse + (i_b * HQ + i_h) * TQ + o_m, b_m + tl.log(b_l), mask=m_m)  # lse (B, HQ, TQ) contiguous


@triton.jit
def sliding_window_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, first,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    TQ, TK, Q_OFF, HQ, G, window, scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr,
):
    """dq (B, HQ, TQ, D) contiguous; do has o's strides (stride_o*); lse / delta (B, HQ, TQ)."""
    i_b, i_h, i_hk, i_m, o_m, m_m, b_q = _query_tile(q, stride_qb, stride_qh, stride_qt, TQ, HQ, G, D, BLOCK_D, BLOCK_M)
    o_pm = Q_OFF + o_m  # the queries' key positions
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    b_do = tl.load(do + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_ot + o_dv[None, :],
                   mask=m_m[:, None] & (o_dv[None, :] < DV), other=0.0)  # [M, BLOCK_DV]
    p_row = (i_b * HQ + i_h) * TQ + o_m
    b_lse = tl.load(lse + p_row, mask=m_m, other=0.0)
    b_delta = tl.load(delta + p_row, mask=m_m, other=0.0)
    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_first = _doc_first(first, o_m, m_m, PACKED)  # [M]
    lo = _band_start(first, i_m, Q_OFF, window, BLOCK_M, BLOCK_N, PACKED)
    hi = tl.minimum(Q_OFF + (i_m + 1) * BLOCK_M, TK)
    for start in range(lo, hi, BLOCK_N):
        o_n, b_k, b_v = _key_tile(p_k, p_v, stride_kt, stride_vt, start, TK, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale
        b_p = tl.where(_band(o_pm, o_n, TK, window, b_first) & m_m[:, None], tl.exp(b_s - b_lse[:, None]), 0.0)  # [M, N]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    p_dq = dq + (i_b * HQ + i_h) * TQ * D + o_m[:, None] * D + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty), mask=m_m[:, None] & (o_d[None, :] < D))


@triton.jit
def sliding_window_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, first,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    TQ, TK, Q_OFF, HQ, G, window, scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr,
):
    """dk (B, HKV, TK, D), dv (B, HKV, TK, DV) contiguous: one program per key tile and kv head,
    summing over the G query heads of the group and the query tiles whose window reaches it
    (none for keys that no query sees: zeros)."""
    i_bk, i_n = tl.program_id(0), tl.program_id(1)
    i_bk = i_bk.to(tl.int64)  # 64-bit: (batch, head) offsets pass 2**31 elements (64 heads x 1M tokens x 128)
    HKV = HQ // G
    i_b = (i_bk // HKV).to(tl.int64)
    i_hk = i_bk % HKV
    o_n, b_k, b_v = _key_tile(k + i_b * stride_kb + i_hk * stride_kh, v + i_b * stride_vb + i_hk * stride_vh,
                              stride_kt, stride_vt, i_n * BLOCK_N, TK, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_n = o_n < TK
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo = tl.maximum(i_n * BLOCK_N - Q_OFF, 0) // BLOCK_M * BLOCK_M  # rows of the queries that reach the tile
    hi = tl.minimum((i_n + 1) * BLOCK_N + window - Q_OFF, TQ)
    for g in range(G):
        i_h = i_hk * G + g
        p_q = q + i_b * stride_qb + i_h * stride_qh
        p_do = do + i_b * stride_ob + i_h * stride_oh
        p_row = (i_b * HQ + i_h) * TQ
        for start in range(lo, hi, BLOCK_M):
            o_m = start + tl.arange(0, BLOCK_M)
            m_m = o_m < TQ
            o_pm = Q_OFF + o_m
            b_q = tl.load(p_q + o_m[:, None] * stride_qt + o_d[None, :], mask=m_m[:, None] & (o_d[None, :] < D), other=0.0)
            b_do = tl.load(p_do + o_m[:, None] * stride_ot + o_dv[None, :], mask=m_m[:, None] & (o_dv[None, :] < DV),
                           other=0.0)
            b_lse = tl.load(lse + p_row + o_m, mask=m_m, other=0.0)
            b_delta = tl.load(delta + p_row + o_m, mask=m_m, other=0.0)
            b_first = _doc_first(first, o_m, m_m, PACKED)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale  # [M, N]
            b_p = tl.where(_band(o_pm, o_n, TK, window, b_first) & m_m[:, None], tl.exp(b_s - b_lse[:, None]), 0.0)
            b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PRECISION)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=PRECISION)
    p_row_k = (i_b * HKV + i_hk) * TK + o_n
    tl.store(dk + p_row_k[:, None] * D + o_d[None, :], (b_dk * scale).to(dk.dtype.element_ty),
             mask=m_n[:, None] & (o_d[None, :] < D))
    tl.store(dv + p_row_k[:, None] * DV + o_dv[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_n[:, None] & (o_dv[None, :] < DV))
