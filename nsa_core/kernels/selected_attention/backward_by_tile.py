"""dQ (and gate-gradient) kernel of selected-block attention by query tile: forward_by_tile.py's
layout (TOKENS consecutive queries x their head set in one BLOCK_R-row tile, walking the union of
their blocks, each row masking the blocks its query did not select), for the backward's by-query
scheme, whose dQ kernel pads one query's heads to 16 rows. The dK/dV pass is unchanged.

Gate gradients: a slot's gradient sums its query's ROWS heads, which sit in different rows of the
tile; each row writes its own (B, HI, ROWS, TQ, S) float32 partial and launch.py sums the heads
(deterministic, no atomics). Rows of slots nothing matched write 0, as the by-query kernel does.

Dimension legend: R rows of the tile (BLOCK_R), N keys of a step (UNION_PER_STEP x BLOCK_N),
S1 slots of a query (S, plus the own block when causal; padded to S1_P).
Naming: i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ tiles (shape in the comment).
"""

import triton
import triton.language as tl

from nsa_core.kernels.grid import split_pid
from nsa_core.kernels.selected_attention.forward_by_tile import _scalar, _union_step


@triton.jit
def selected_attention_bwd_dq_by_tile_kernel(
    q, k, v, do, lse, delta, sel, gates, union, count, dq, dgate_rows, table, W,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    TQ, TK, Q_OFF, HI, NT, scale,
    S: tl.constexpr, S1: tl.constexpr, S1_P: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_R: tl.constexpr, UNION_PER_STEP: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATES: tl.constexpr,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr,
):
    """q and dq share q's layout; do contiguous (B, HQ, TQ, DV); lse, delta (B, HQ, TQ); sel, union,
    count as forward_by_tile's kernel; dgate_rows (B, HI, ROWS, TQ, S) when HAS_GATES."""
    N: tl.constexpr = UNION_PER_STEP * BLOCK_N
    U: tl.constexpr = TOKENS * S1
    i_tile, i_bh = split_pid(NT)
    i_b = (i_bh // HI).to(tl.int64)
    i_hs = i_bh % HI
    i_hq0 = i_hs * ROWS
    i_hk = i_hq0 // G
    o_r = tl.arange(0, BLOCK_R)
    o_tok = o_r // ROWS
    o_h = o_r % ROWS
    o_t = i_tile * TOKENS + o_tok
    m_r = (o_tok < TOKENS) & (o_t < TQ)
    o_t = tl.where(m_r, o_t, 0)
    o_pos = Q_OFF + o_t
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_s = tl.arange(0, S1_P)
    o_hq = i_hq0 + o_h

    p_rows = i_b * stride_qb + o_hq[:, None] * stride_qh + o_t[:, None] * stride_qt
    b_q = tl.load(q + p_rows + o_d[None, :], mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)  # [R, BLOCK_D]
    p_do = ((i_b * (HI * ROWS) + o_hq) * TQ + o_t).to(tl.int64) * DV
    b_do = tl.load(do + p_do[:, None] + o_dv[None, :], mask=m_r[:, None] & (o_dv[None, :] < DV), other=0.0)  # [R, BLOCK_DV]
    p_stat = (i_b * (HI * ROWS) + o_hq) * TQ + o_t
    b_lse = tl.load(lse + p_stat, mask=m_r, other=float("inf"))
    b_delta = tl.load(delta + p_stat, mask=m_r, other=0.0)
    p_row_sel = (i_bh.to(tl.int64) * NT * TOKENS + i_tile * TOKENS + o_tok) * S1
    m_sel = m_r[:, None] & (o_s[None, :] < S1)
    b_sel = tl.load(sel + p_row_sel[:, None] + o_s[None, :], mask=m_sel, other=-1)  # [R, S1_P]
    b_sel_gate = tl.full([BLOCK_R, S1_P], 1.0, dtype=tl.float32)
    if HAS_GATES:
        p_gate = (i_bh.to(tl.int64) * TQ + o_t) * S
        b_sel_gate = tl.load(gates + p_gate[:, None] + o_s[None, :], mask=m_sel & (o_s[None, :] < S),
                             other=1.0).to(tl.float32)

    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh
    b_dq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    b_dgate = tl.zeros([BLOCK_R, S1_P], dtype=tl.float32)  # each (row, slot): the one block it names

    o_n = tl.arange(0, N)
    o_u = tl.arange(0, UNION_PER_STEP)
    p_union = union + (i_bh.to(tl.int64) * NT + i_tile) * U
    n_union = _scalar(count, i_bh.to(tl.int64) * NT + i_tile)
    for step in range(0, n_union, UNION_PER_STEP):
        m, b_gate, b_k, b_v, b_ublk = _union_step(
            p_union, step, n_union, b_sel, b_sel_gate, m_r, o_pos, p_k, p_v, stride_kt, stride_vt, TK, table, W,
            UNION_PER_STEP, BLOCK, BLOCK_N, BLOCK_R, N, D, DV, BLOCK_D, BLOCK_DV, CAUSAL, WINDOW, PACKED)
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [R, N]
        b_p = tl.where(m, tl.exp(b_qk * (scale * b_gate) - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [R, N]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot((b_ds * (scale * b_gate)).to(b_k.dtype), b_k, input_precision=PRECISION)
        if HAS_GATES:
            b_dsqk = b_ds * b_qk
            for j in tl.static_range(UNION_PER_STEP):
                b_blk_j = tl.sum(tl.where(o_u == j, b_ublk, 0))
                b_dg_j = tl.sum(tl.where((o_n // BLOCK_N == j)[None, :], b_dsqk, 0.0), axis=1) * scale  # [R]
                b_match = (b_sel == b_blk_j) & (b_blk_j >= 0)  # [R, S1_P]
                b_dgate = tl.where(b_match, b_dg_j[:, None], b_dgate)

    tl.store(dq + p_rows + o_d[None, :], b_dq.to(dq.dtype.element_ty), mask=m_r[:, None] & (o_d[None, :] < D))
    if HAS_GATES:
        p_dg = (((i_bh.to(tl.int64) * ROWS + o_h) * TQ) + o_t) * S  # dgate_rows (B, HI, ROWS, TQ, S)
        tl.store(dgate_rows + p_dg[:, None] + o_s[None, :], b_dgate, mask=m_r[:, None] & (o_s[None, :] < S))
