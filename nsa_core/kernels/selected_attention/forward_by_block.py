"""Forward of selected-block attention by key block, for small query groups.

With few query heads per kv head, a query token's program would load 16 key blocks to use each
for a handful of rows. Here a program owns one key block of one kv head instead, loads it once,
and walks every (query token, head set, slot) entry that selected it (the CSR index of
launch.py), then the queries of the block itself (the causal own block, slot S). For each entry
it writes a partial result (no two programs write the same entry, so the entries of a block
chosen by many queries can be dealt to several programs): the softmax-normalised output over this block's keys, the row max
and the row sum. launch.py merges the S + 1 partials of each query.
TQ queries over TK keys, query i at key position Q_OFF + i (forward.py's docstring).
Packed documents (PACKED, Q_OFF = 0): blocks are virtual blocks (launch.packed_block_table), whose
keys and own queries `table` gives (by_block.py), as in the dK/dV kernel.

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


@triton.jit
def _partial_rows(b_k, b_v, o_key, m_key, q, p_qrow, o_pos, b_gate, m_row, scale,
                  BLOCK_D: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    o_d = tl.arange(0, BLOCK_D)
    b_q = tl.load(q + p_qrow[:, None] + o_d[None, :], mask=m_row[:, None] & (o_d[None, :] < D), other=0.0)  # [M, BLOCK_D]
    m = m_row[:, None] & m_key[None, :]
    if CAUSAL:
        m = m & (o_key[None, :] <= o_pos[:, None])
    if WINDOW > 0:
        m = m & (o_key[None, :] >= o_pos[:, None] - WINDOW)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * (scale * b_gate)[:, None]  # [M, BLOCK_N]
    b_s = tl.where(m, b_s, float("-inf"))
    b_m = tl.max(b_s, axis=1)  # [M]
    b_p = tl.exp(b_s - tl.where(b_m == float("-inf"), 0.0, b_m)[:, None])
    b_l = tl.sum(b_p, axis=1)
    b_o = tl.dot(b_p.to(b_k.dtype), b_v, input_precision=PRECISION) / tl.where(b_l > 0, b_l, 1.0)[:, None]  # [M, BLOCK_DV]
    return b_o, b_m, b_l


@triton.jit
def _store_partials(o_part, m_part, l_part, b_o, b_m, b_l, p_part, m_row, BLOCK_DV: tl.constexpr, DV: tl.constexpr):
    p_part = p_part.to(tl.int64)  # partial tensors pass 2**31 elements at long sequences
    o_dv = tl.arange(0, BLOCK_DV)
    tl.store(o_part + p_part[:, None] * DV + o_dv[None, :], b_o.to(o_part.dtype.element_ty), mask=m_row[:, None] & (o_dv[None, :] < DV))
    tl.store(m_part + p_part, b_m, mask=m_row)
    tl.store(l_part + p_part, b_l, mask=m_row)


@triton.jit
def selected_attention_fwd_by_block_kernel(
    q, k, v, entries, offsets, gates, o_part, m_part, l_part, table, W,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    TQ, TK, Q_OFF, HI, HKV, NB, scale, NUM_SPLITS,
    S: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, ROWS_P: tl.constexpr, G_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATES: tl.constexpr,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr,
):
    i_blk, i_bk = split_pid(NB)  # over key blocks, then (batch, kv head)
    i_bk = i_bk.to(tl.int64)  # 64-bit: (batch, head) offsets pass 2**31 elements (64 heads x 1M tokens x 128)
    i_split = tl.program_id(1)  # the block's entries are dealt to NUM_SPLITS programs, step by step
    STEP: tl.constexpr = BLOCK_M // ROWS_P
    i_b = (i_bk // HKV).to(tl.int64)
    i_hk = i_bk % HKV
    HQ = HI * ROWS
    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh
    o_key, m_key, b_k, b_v = load_key_block(p_k, p_v, stride_kt, stride_vt, i_blk, TK, BLOCK, BLOCK_N, BLOCK_D, BLOCK_DV, D,
                                            DV, table, W, PACKED)

    # 1. the (query, head set, slot) entries that selected this block
    start, end = segment_bounds(offsets, i_bk * NB + i_blk)
    for pos in range(start + i_split * STEP, end, STEP * NUM_SPLITS):  # a for loop: Triton pipelines its loads
        lin, m_row, o_t, o_hq, o_s = entry_rows(entries, pos, end, TQ, HI, S, ROWS, ROWS_P, BLOCK_M)
        b_gate = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if HAS_GATES:
            b_gate = tl.load(gates + lin, mask=m_row, other=0.0).to(tl.float32)
        b_o, b_mx, b_l = _partial_rows(b_k, b_v, o_key, m_key, q, i_b * stride_qb + o_hq * stride_qh + o_t * stride_qt,
                                       Q_OFF + o_t, b_gate, m_row, scale, BLOCK_D, D, CAUSAL, WINDOW, PRECISION)
        _store_partials(o_part, m_part, l_part, b_o, b_mx, b_l, ((i_b * HQ + o_hq) * TQ + o_t) * (S + 1) + o_s, m_row, BLOCK_DV,
                        DV)

    # 2. the queries of the block itself, all G query heads of this kv head: slot S
    if CAUSAL and i_split == 0:
        lo, hi = own_block_steps(i_blk, TQ, Q_OFF, BLOCK, PACKED)
        for step in range(lo, hi, BLOCK_M // G_P):
            o_t, o_pos, m_row, o_hq = own_block_rows(i_blk, step, i_hk, TQ, TK, Q_OFF, G, BLOCK, G_P, BLOCK_M, table, W,
                                                     PACKED)
            b_gate = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
            b_o, b_mx, b_l = _partial_rows(b_k, b_v, o_key, m_key, q, i_b * stride_qb + o_hq * stride_qh + o_t * stride_qt,
                                           o_pos, b_gate, m_row, scale, BLOCK_D, D, CAUSAL, WINDOW, PRECISION)
            _store_partials(o_part, m_part, l_part, b_o, b_mx, b_l, ((i_b * HQ + o_hq) * TQ + o_t) * (S + 1) + S, m_row,
                            BLOCK_DV, DV)


@triton.jit
def merge_partials_kernel(
    o_part, m_part, l_part, idx, o, lse,
    stride_ob, stride_oh, stride_ot,
    TQ, HQ, HI, G,
    S: tl.constexpr, SP: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr,
):
    """One query row (query t, query head): merge its S + 1 partials into the output and lse."""
    i_t, i_bh = split_pid(TQ)  # over queries, then (batch, query head)
    i_bh = i_bh.to(tl.int64)  # 64-bit: (batch, head) offsets pass 2**31 elements (64 heads x 1M tokens x 128)
    i_b = (i_bh // HQ).to(tl.int64)
    i_hq = i_bh % HQ
    i_hs = i_hq // (HQ // HI)  # selection head of this query head
    o_s = tl.arange(0, SP)
    o_dv = tl.arange(0, BLOCK_DV)
    b_blk = tl.load(idx + ((i_b * HI + i_hs) * TQ + i_t) * S + o_s, mask=o_s < S, other=-1)
    m_slot = (b_blk >= 0) & (o_s < S)
    if CAUSAL:
        m_slot = m_slot | (o_s == S)
    p_row = (i_bh.to(tl.int64) * TQ + i_t) * (S + 1)  # partial tensors pass 2**31 elements
    b_m = tl.load(m_part + p_row + o_s, mask=m_slot, other=float("-inf"))
    b_l = tl.load(l_part + p_row + o_s, mask=m_slot, other=0.0)
    m_slot = m_slot & (b_l > 0)
    b_m = tl.where(m_slot, b_m, float("-inf"))
    b_max = tl.max(b_m, axis=0)
    b_base = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_w = tl.where(m_slot, b_l * tl.exp(b_m - b_base), 0.0)  # [SP]
    b_sum = tl.sum(b_w, axis=0)
    b_op = tl.load(o_part + (p_row + o_s)[:, None] * DV + o_dv[None, :], mask=m_slot[:, None] & (o_dv[None, :] < DV), other=0.0)
    b_out = tl.sum(b_op.to(tl.float32) * b_w[:, None], axis=0) / tl.where(b_sum > 0, b_sum, 1.0)  # [BLOCK_DV]
    tl.store(o + i_b * stride_ob + i_hq * stride_oh + i_t * stride_ot + o_dv, b_out.to(o.dtype.element_ty), mask=o_dv < DV)
    tl.store(lse + i_bh * TQ + i_t, tl.where(b_sum > 0, b_base + tl.log(tl.where(b_sum > 0, b_sum, 1.0)), float("inf")))
