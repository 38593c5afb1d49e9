"""Backward kernels of selected-block attention (atomics only for the by-block dq, and only when
torch.use_deterministic_algorithms is off).

- dQ (and the gate gradients): the forward's layout, one program per query token and head set,
  re-walking its selected blocks.
- dK/dV: one program per key block and kv head, walking the (query, head set) entries that
  selected the block, found through a CSR index (entries sorted by key block, built in
  launch.py), then the queries of the block itself (the causal own block). Each dK/dV element
  is written by exactly one program: deterministic. For small groups (the by-block scheme) it
  also computes the rows' dq over its block, stored as partials that sum_dq_partials_kernel
  adds up (deterministic) or added atomically into a float32 buffer.

TQ queries over TK keys, query i at key position Q_OFF + i (forward.py's docstring): dq, do, lse and
the selection have TQ rows, dK / dV all TK keys.

Naming: i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ tiles (shape in the comment).
"""

import triton
import triton.language as tl

from nsa_core.kernels.grid import split_pid

from nsa_core.kernels.selected_attention.by_block import (
    entry_rows,
    load_key_block,
    own_block_rows,
    own_block_steps,
    segment_bounds,
)
from nsa_core.kernels.selected_attention.forward import own_block_keys, slot_keys


@triton.jit
def _dq_keys(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, stride_kt, stride_vt, o_key, m_key, b_gate, scale,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, PRECISION: tl.constexpr):
    """dq contribution of one key tile; also returns sum_rows(ds * qk) per key column (for dgates)."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    b_k = tl.load(p_k + o_key[:, None] * stride_kt + o_d[None, :], mask=m_key[:, None] & (o_d[None, :] < D), other=0.0)
    b_v = tl.load(p_v + o_key[:, None] * stride_vt + o_dv[None, :], mask=m_key[:, None] & (o_dv[None, :] < DV), other=0.0)
    b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [ROWS_P, N]
    b_p = tl.where(m_key[None, :], tl.exp(b_qk * (scale * b_gate)[None, :] - b_lse[:, None]), 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [ROWS_P, N]
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq += tl.dot((b_ds * (scale * b_gate)[None, :]).to(b_k.dtype), b_k, input_precision=PRECISION)
    b_dgate_col = tl.sum(b_ds * b_qk, axis=0) * scale  # [N]
    return b_dq, b_dgate_col


@triton.jit
def selected_attention_bwd_dq_kernel(
    q, k, v, do, lse, delta, idx, gates, dq, dgates, table, W,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    TQ, TK, Q_OFF, HI, scale,
    S: tl.constexpr, SLOTS_PER_STEP: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, ROWS_P: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATES: tl.constexpr,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr,
):
    i_t, i_bh = split_pid(TQ)  # over queries, then (batch, selection head)
    i_bh = i_bh.to(tl.int64)  # 64-bit: (batch, head) offsets pass 2**31 elements (64 heads x 1M tokens x 128)
    i_b = (i_bh // HI).to(tl.int64)  # 64-bit: batch offsets pass 2**31 elements
    i_hs = i_bh % HI
    i_hq0 = i_hs * ROWS
    i_hk = i_hq0 // G
    o_r = tl.arange(0, ROWS_P)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_r = o_r < ROWS
    # q and dq share q's layout; do is contiguous (B, HQ, TQ, DV); lse, delta (B, HQ, TQ)
    p_rows = i_b * stride_qb + (i_hq0 + o_r)[:, None] * stride_qh + i_t * stride_qt
    b_q = tl.load(q + p_rows + o_d[None, :], mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)  # [ROWS_P, BLOCK_D]
    p_do_rows = i_b * (HI * ROWS * TQ * DV) + (i_hq0 + o_r)[:, None] * (TQ * DV) + i_t * DV
    b_do = tl.load(do + p_do_rows + o_dv[None, :], mask=m_r[:, None] & (o_dv[None, :] < DV), other=0.0)  # [ROWS_P, BLOCK_DV]
    p_stat = (i_b * (HI * ROWS) + i_hq0 + o_r) * TQ + i_t
    b_lse = tl.load(lse + p_stat, mask=m_r, other=float("inf"))
    b_delta = tl.load(delta + p_stat, mask=m_r, other=0.0)
    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh
    b_dq = tl.zeros([ROWS_P, BLOCK_D], dtype=tl.float32)

    t_pos = Q_OFF + i_t  # the query's key position
    p_sel = (i_bh * TQ + i_t) * S
    for step in range(0, S, SLOTS_PER_STEP):
        o_key, m_key, b_gate = slot_keys(idx, gates, p_sel, step, t_pos, TK, table, W, S, SLOTS_PER_STEP, BLOCK, BLOCK_N,
                                         CAUSAL, HAS_GATES, WINDOW, PACKED)
        b_dq, b_dgate_col = _dq_keys(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, stride_kt, stride_vt, o_key, m_key, b_gate,
                                     scale, BLOCK_D, BLOCK_DV, D, DV, PRECISION)
        if HAS_GATES:
            b_dgate = tl.sum(tl.reshape(b_dgate_col, (SLOTS_PER_STEP, BLOCK_N)), axis=1)  # [SLOTS_PER_STEP]
            o_slot = step + tl.arange(0, SLOTS_PER_STEP)
            tl.store(dgates + p_sel + o_slot, b_dgate, mask=o_slot < S)
    if CAUSAL:
        o_key, m_key, b_gate = own_block_keys(t_pos, TK, table, W, BLOCK, BLOCK_N, WINDOW, PACKED)
        b_dq, _ = _dq_keys(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, stride_kt, stride_vt, o_key, m_key, b_gate,
                           scale, BLOCK_D, BLOCK_DV, D, DV, PRECISION)
    tl.store(dq + p_rows + o_d[None, :], b_dq.to(dq.dtype.element_ty), mask=m_r[:, None] & (o_d[None, :] < D))


@triton.jit
def _accumulate_dkdv(
    b_dk, b_dv, b_k, b_v, o_key, m_key, q, do, lse, delta,
    p_qrow, p_dorow, p_stat, o_pos, b_gate, m_row, scale,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, DQ_PARTIAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK/dV of one key block from M query rows (at key positions o_pos); with DQ_PARTIAL also those
    rows' dq over this block [M, BLOCK_D] and their gate gradient sum_keys(ds * qk) * scale [M]."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    b_q = tl.load(q + p_qrow[:, None] + o_d[None, :], mask=m_row[:, None] & (o_d[None, :] < D), other=0.0)  # [M, BLOCK_D]
    b_do = tl.load(do + p_dorow[:, None] + o_dv[None, :], mask=m_row[:, None] & (o_dv[None, :] < DV), other=0.0)  # [M, BLOCK_DV]
    b_lse = tl.load(lse + p_stat, mask=m_row, other=float("inf"))
    b_delta = tl.load(delta + p_stat, mask=m_row, other=0.0)
    m = m_row[:, None] & m_key[None, :]
    if CAUSAL:
        m = m & (o_key[None, :] <= o_pos[:, None])
    if WINDOW > 0:
        m = m & (o_key[None, :] >= o_pos[:, None] - WINDOW)
    b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [M, BLOCK_N]
    b_p = tl.where(m, tl.exp(b_qk * (scale * b_gate)[:, None] - b_lse[:, None]), 0.0)
    b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PRECISION)  # [BLOCK_N, BLOCK_DV]
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [M, BLOCK_N]
    b_ds_raw = b_p * (b_dp - b_delta[:, None])
    b_ds = b_ds_raw * (scale * b_gate)[:, None]
    b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]
    b_dq_rows = b_q.to(tl.float32) * 0.0
    b_dgate_rows = b_delta * 0.0
    if DQ_PARTIAL:
        b_dq_rows = tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)  # [M, BLOCK_D]
        b_dgate_rows = tl.sum(b_ds_raw * b_qk, axis=1) * scale
    return b_dk, b_dv, b_dq_rows, b_dgate_rows


@triton.jit
def _write_dq_rows(dq_part, b_dq_rows, p_partial, p_row, m_row, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   DQ_ATOMIC: tl.constexpr):
    """Rows' dq over one key block [M, BLOCK_D]: stored as the (row, slot) partial, or (DQ_ATOMIC)
    added atomically into a float32 (B, HQ, TQ, D) accumulator."""
    o_d = tl.arange(0, BLOCK_D)
    m = m_row[:, None] & (o_d[None, :] < D)
    if DQ_ATOMIC:
        tl.atomic_add(dq_part + p_row.to(tl.int64)[:, None] * D + o_d[None, :], b_dq_rows, mask=m, sem="relaxed")
    else:
        tl.store(dq_part + p_partial.to(tl.int64)[:, None] * D + o_d[None, :], b_dq_rows, mask=m)


@triton.jit
def selected_attention_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, entries, offsets, gates, dk, dv, dq_part, dgates, table, W,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    TQ, TK, Q_OFF, HI, HKV, NB, scale,
    S: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, ROWS_P: tl.constexpr, G_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATES: tl.constexpr,
    DQ_PARTIAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    PACKED: tl.constexpr,
):
    """dK/dV of one key block (and, with DQ_PARTIAL, the dq of the rows that attend it — as partials
    (B, HQ, TQ, S + 1, D), slot S being the own block, or with DQ_ATOMIC added into a float32
    (B, HQ, TQ, D) buffer — plus the gate gradients of its entries)."""
    i_blk, i_bk = split_pid(NB)  # over key blocks, then (batch, kv head)
    i_bk = i_bk.to(tl.int64)  # 64-bit: (batch, head) offsets pass 2**31 elements (64 heads x 1M tokens x 128)
    i_b = (i_bk // HKV).to(tl.int64)
    i_hk = i_bk % HKV
    HQ = HI * ROWS
    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh
    o_key, m_key, b_k, b_v = load_key_block(p_k, p_v, stride_kt, stride_vt, i_blk, TK, BLOCK, BLOCK_N, BLOCK_D, BLOCK_DV, D,
                                            DV, table, W, PACKED)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    o_d = tl.arange(0, BLOCK_D)

    # 1. the (query, head set, slot) entries that selected this block
    ENTRIES_PER_STEP: tl.constexpr = BLOCK_M // ROWS_P
    start, end = segment_bounds(offsets, i_bk * NB + i_blk)
    for pos in range(start, end, ENTRIES_PER_STEP):  # a for loop: Triton pipelines its loads
        lin, m_row, o_t, o_hq, o_s = entry_rows(entries, pos, end, TQ, HI, S, ROWS, ROWS_P, BLOCK_M)
        b_gate = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if HAS_GATES:
            b_gate = tl.load(gates + lin, mask=m_row, other=0.0).to(tl.float32)
        b_dk, b_dv, b_dq_rows, b_dgate_rows = _accumulate_dkdv(
            b_dk, b_dv, b_k, b_v, o_key, m_key, q, do, lse, delta,
            i_b * stride_qb + o_hq * stride_qh + o_t * stride_qt, i_b * (HQ * TQ * DV) + o_hq * (TQ * DV) + o_t * DV,
            (i_b * HQ + o_hq) * TQ + o_t, Q_OFF + o_t, b_gate, m_row, scale,
            BLOCK_D, BLOCK_DV, D, DV, CAUSAL, DQ_PARTIAL, WINDOW, PRECISION)
        if DQ_PARTIAL:
            _write_dq_rows(dq_part, b_dq_rows, ((i_b * HQ + o_hq) * TQ + o_t) * (S + 1) + o_s, (i_b * HQ + o_hq) * TQ + o_t,
                           m_row, D, BLOCK_D, DQ_ATOMIC)
            if HAS_GATES:
                b_dgate = tl.sum(tl.reshape(b_dgate_rows, (ENTRIES_PER_STEP, ROWS_P)), axis=1)
                lin_e = tl.max(tl.reshape(lin, (ENTRIES_PER_STEP, ROWS_P)), axis=1)
                m_e = tl.max(tl.reshape(m_row.to(tl.int32), (ENTRIES_PER_STEP, ROWS_P)), axis=1) > 0
                tl.store(dgates + lin_e, b_dgate, mask=m_e)

    # 2. the queries of the block itself, all G query heads of this kv head (causal own block)
    if CAUSAL:
        lo, hi = own_block_steps(i_blk, TQ, Q_OFF, BLOCK, PACKED)
        for step in range(lo, hi, BLOCK_M // G_P):
            o_t, o_pos, m_row, o_hq = own_block_rows(i_blk, step, i_hk, TQ, TK, Q_OFF, G, BLOCK, G_P, BLOCK_M, table, W, PACKED)
            b_gate = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
            b_dk, b_dv, b_dq_rows, b_dgate_rows = _accumulate_dkdv(
                b_dk, b_dv, b_k, b_v, o_key, m_key, q, do, lse, delta,
                i_b * stride_qb + o_hq * stride_qh + o_t * stride_qt, i_b * (HQ * TQ * DV) + o_hq * (TQ * DV) + o_t * DV,
                (i_b * HQ + o_hq) * TQ + o_t, o_pos, b_gate, m_row, scale,
                BLOCK_D, BLOCK_DV, D, DV, CAUSAL, DQ_PARTIAL, WINDOW, PRECISION)
            if DQ_PARTIAL:
                _write_dq_rows(dq_part, b_dq_rows, ((i_b * HQ + o_hq) * TQ + o_t) * (S + 1) + S, (i_b * HQ + o_hq) * TQ + o_t,
                               m_row, D, BLOCK_D, DQ_ATOMIC)

    o_dv = tl.arange(0, BLOCK_DV)
    p_dk = dk + ((i_b * HKV + i_hk) * TK + o_key[:, None]) * D + o_d[None, :]
    p_dv = dv + ((i_b * HKV + i_hk) * TK + o_key[:, None]) * DV + o_dv[None, :]
    tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_key[:, None] & (o_d[None, :] < D))
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_key[:, None] & (o_dv[None, :] < DV))


@triton.jit
def sum_dq_partials_kernel(
    dq_part, idx, dq,
    stride_qb, stride_qh, stride_qt,
    TQ, HQ, HI,
    S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, CAUSAL: tl.constexpr,
):
    """BLOCK_T tokens of one query head: dq = sum of the (query row, slot) partials (B, HQ, TQ, S + 1, D)
    over its valid slots (and the own block's, slot S, when causal), written in dq's dtype. Slots
    nothing wrote (invalid) are never read: one pass over the partials."""
    i_tb, i_bh = split_pid(tl.cdiv(TQ, BLOCK_T))  # over token blocks, then (batch, query head)
    i_bh = i_bh.to(tl.int64)  # 64-bit: (batch, head) offsets pass 2**31 elements (64 heads x 1M tokens x 128)
    i_b = (i_bh // HQ).to(tl.int64)
    i_hq = i_bh % HQ
    i_hs = i_hq // (HQ // HI)  # selection head of this query head
    o_t = i_tb * BLOCK_T + tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    m_t = o_t < TQ
    m_d = o_d[None, :] < D
    p_sel = ((i_b * HI + i_hs) * TQ + o_t) * S  # [BLOCK_T]
    p_part = (i_bh.to(tl.int64) * TQ + o_t) * (S + 1)  # [BLOCK_T]; partials pass 2**31 elements
    b_dq = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(S):
        m_slot = m_t & (tl.load(idx + p_sel + s, mask=m_t, other=-1) >= 0)
        b_dq += tl.load(dq_part + (p_part + s)[:, None] * D + o_d[None, :], mask=m_slot[:, None] & m_d, other=0.0)
    if CAUSAL:
        b_dq += tl.load(dq_part + (p_part + S)[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d, other=0.0)
    p_dq = dq + i_b * stride_qb + i_hq * stride_qh + o_t[:, None] * stride_qt + o_d[None, :]
    tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=m_t[:, None] & m_d)
