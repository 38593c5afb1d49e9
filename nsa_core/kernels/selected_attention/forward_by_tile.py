"""Forward kernel of selected-block attention by query tile: several queries' heads in one tile.

One program = TOKENS consecutive queries of one (batch, selection head) x the ROWS query heads that
share their selection: TOKENS x ROWS rows of one BLOCK_R-row tile (64: Hopper's warpgroup MMA
height; e.g. 16 queries x 4 heads, 4 x 16, 21 x 3), where the by-query kernel pads one query's
ROWS heads to 16 rows. The program walks the union of its queries' selected blocks (tile_union.py:
distinct block ids in increasing order, the own blocks included when causal), UNION_PER_STEP blocks
per key tile, loading each block once for the whole tile. A row attends a block's keys only if its
query selected the block (membership against the query's S1 slots, with that slot's gate scaling
the logits, as in forward.py) or it is the query's own block (slot S, gate 1); causal and window
masks by key position as in forward.py. Output o and lse as the by-query kernel writes them (the
backward runs off them unchanged); the blocks are visited in another order, so results differ
from it only by rounding.

Packed documents (PACKED, Q_OFF = 0): block ids are virtual blocks (launch.packed_block_table),
so the queries of one tile may belong to different documents: their unions never mix blocks.

Dimension legend: R rows of the tile (BLOCK_R), N keys of a step (UNION_PER_STEP x BLOCK_N),
S1 slots of a query (S, plus the own block when causal; padded to S1_P), U union entries of a tile.
Naming: i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ tiles (shape in the comment).
"""

import triton
import triton.language as tl

from nsa_core.kernels.grid import split_pid
from nsa_core.kernels.online_softmax import online_softmax_step
from nsa_core.kernels.selected_attention.forward import block_keys


@triton.jit
def _scalar(p, i):
    """p[i] as a scalar (a scalar load would be a 1-element array in the interpreter, which a
    loop bound cannot take: by_block.segment_bounds)."""
    o_two = tl.arange(0, 2)
    return tl.sum(tl.load(p + i + o_two, mask=o_two == 0, other=0))


@triton.jit
def _membership(b_sel, b_sel_gate, b_ublk, o_n,
                UNION_PER_STEP: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr, N: tl.constexpr):
    """Which rows selected each column's block, and with which gate: ([R, N] mask, [R, N] gate).
    b_sel [R, S1_P] the rows' slots (-1 none), b_sel_gate [R, S1_P], b_ublk [UNION_PER_STEP] the blocks."""
    o_u = tl.arange(0, UNION_PER_STEP)
    o_col_blk = o_n // BLOCK_N
    b_hit = tl.zeros([R, N], dtype=tl.int1)
    b_gate = tl.zeros([R, N], dtype=tl.float32)
    for j in tl.static_range(UNION_PER_STEP):
        b_blk = tl.sum(tl.where(o_u == j, b_ublk, 0))  # scalar: the step's j-th block (-1: none)
        b_match = (b_sel == b_blk) & (b_blk >= 0)  # [R, S1_P]
        b_found = tl.max(b_match.to(tl.int32), axis=1) > 0  # [R]
        b_g = tl.sum(tl.where(b_match, b_sel_gate, 0.0), axis=1)  # [R]
        b_col = (o_col_blk == j)[None, :]
        b_hit = tl.where(b_col, b_found[:, None], b_hit)
        b_gate = tl.where(b_col, b_g[:, None], b_gate)
    return b_hit, b_gate


@triton.jit
def _union_step(p_union, step, n_union, b_sel, b_sel_gate, m_r, o_pos, p_k, p_v, stride_kt, stride_vt, TK, table, W,
                UNION_PER_STEP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr,
                N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PACKED: tl.constexpr):
    """One step over the tile's union: blocks step ... step + UNION_PER_STEP - 1 as one key tile of N keys
    -> (m [R, N] the keys each row attends, b_gate [R, N] its slot's gate, b_k [N, BLOCK_D], b_v [N, BLOCK_DV],
    b_ublk [UNION_PER_STEP] the step's blocks, -1 past the union)."""
    o_n = tl.arange(0, N)
    o_u = tl.arange(0, UNION_PER_STEP)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    b_ublk = tl.load(p_union + step + o_u, mask=step + o_u < n_union, other=-1)  # [UNION_PER_STEP]
    b_blk = tl.load(p_union + step + o_n // BLOCK_N, mask=step + o_n // BLOCK_N < n_union, other=-1)  # [N]
    o_key, m_key = block_keys(b_blk, b_blk >= 0, o_n % BLOCK_N, TK, table, W, BLOCK, PACKED)
    b_hit, b_gate = _membership(b_sel, b_sel_gate, b_ublk, o_n, UNION_PER_STEP, BLOCK_N, R, N)
    m = b_hit & m_key[None, :] & m_r[:, None]
    if CAUSAL:
        m = m & (o_key[None, :] <= o_pos[:, None])
    if WINDOW > 0:
        m = m & (o_key[None, :] >= o_pos[:, None] - WINDOW)
    b_k = tl.load(p_k + o_key[:, None] * stride_kt + o_d[None, :], mask=m_key[:, None] & (o_d[None, :] < D), other=0.0)
    b_v = tl.load(p_v + o_key[:, None] * stride_vt + o_dv[None, :], mask=m_key[:, None] & (o_dv[None, :] < DV),
                  other=0.0)
    return m, b_gate, b_k, b_v, b_ublk


@triton.jit
def selected_attention_fwd_by_tile_kernel(
    q, k, v, sel, gates, union, count, o, lse, table, W,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    TQ, TK, Q_OFF, HI, NT, scale,
    S: tl.constexpr, S1: tl.constexpr, S1_P: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_R: tl.constexpr, UNION_PER_STEP: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATES: tl.constexpr,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr,
):
    """sel (B, HI, NT * TOKENS, S1) int32 the tiles' slots; union (B, HI, NT, TOKENS * S1) int32
    and count (B, HI, NT) int32 (tile_union.py); gates (B, HI, TQ, S) when HAS_GATES."""
    N: tl.constexpr = UNION_PER_STEP * BLOCK_N
    U: tl.constexpr = TOKENS * S1
    i_tile, i_bh = split_pid(NT)  # the tile, then (batch, selection head)
    i_b = (i_bh // HI).to(tl.int64)  # 64-bit: batch offsets pass 2**31 elements
    i_hs = i_bh % HI
    i_hq0 = i_hs * ROWS  # first query head of this program
    i_hk = i_hq0 // G
    o_r = tl.arange(0, BLOCK_R)
    o_tok = o_r // ROWS  # the row's query within the tile
    o_h = o_r % ROWS  # the row's head within the head set
    o_t = i_tile * TOKENS + o_tok  # the row's query
    m_r = (o_tok < TOKENS) & (o_t < TQ)
    o_t = tl.where(m_r, o_t, 0)
    o_pos = Q_OFF + o_t  # the row's key position
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_s = tl.arange(0, S1_P)

    p_q = q + i_b * stride_qb + (i_hq0 + o_h)[:, None] * stride_qh + o_t[:, None] * stride_qt + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)  # [R, BLOCK_D]
    # each row's slots (its query's) and their gates, [R, S1_P]; the own block (slot S) has gate 1
    p_row_sel = (i_bh.to(tl.int64) * NT * TOKENS + i_tile * TOKENS + o_tok) * S1  # sel is (B, HI, NT * TOKENS, S1)
    m_sel = m_r[:, None] & (o_s[None, :] < S1)
    b_sel = tl.load(sel + p_row_sel[:, None] + o_s[None, :], mask=m_sel, other=-1)
    b_sel_gate = tl.full([BLOCK_R, S1_P], 1.0, dtype=tl.float32)
    if HAS_GATES:
        p_gate = (i_bh.to(tl.int64) * TQ + o_t) * S  # gates is (B, HI, TQ, S)
        b_sel_gate = tl.load(gates + p_gate[:, None] + o_s[None, :], mask=m_sel & (o_s[None, :] < S),
                             other=1.0).to(tl.float32)

    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh
    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)

    p_union = union + (i_bh.to(tl.int64) * NT + i_tile) * U
    n_union = _scalar(count, i_bh.to(tl.int64) * NT + i_tile)
    for step in range(0, n_union, UNION_PER_STEP):
        m, b_gate, b_k, b_v, _ = _union_step(
            p_union, step, n_union, b_sel, b_sel_gate, m_r, o_pos, p_k, p_v, stride_kt, stride_vt, TK, table, W,
            UNION_PER_STEP, BLOCK, BLOCK_N, BLOCK_R, N, D, DV, BLOCK_D, BLOCK_DV, CAUSAL, WINDOW, PACKED)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * (scale * b_gate)  # [R, N]
        b_s = tl.where(m, b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_m, b_l, b_acc, b_s, b_v, PRECISION)

    b_has = b_l > 0
    b_out = b_acc / tl.where(b_has, b_l, 1.0)[:, None]
    b_lse = tl.where(b_has, b_m + tl.log(tl.where(b_has, b_l, 1.0)), float("inf"))
    p_o = o + i_b * stride_ob + (i_hq0 + o_h)[:, None] * stride_oh + o_t[:, None] * stride_ot + o_dv[None, :]
    tl.store(p_o, b_out.to(o.dtype.element_ty), mask=m_r[:, None] & (o_dv[None, :] < DV))
    p_lse = lse + (i_b * (HI * ROWS) + i_hq0 + o_h) * TQ + o_t  # lse (B, HQ, TQ) contiguous
    tl.store(p_lse, b_lse, mask=m_r)
