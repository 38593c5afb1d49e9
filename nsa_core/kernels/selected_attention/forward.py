"""Forward kernel of selected-block attention, group-centric.

One program = one query token t and one set of ROWS query heads that share a selection (the G
heads of a kv group when heads share the selection, else one head), padded to ROWS_P >= 16 rows
so the tensor cores get a full tile. Each selected key block is loaded once for all those heads.
SLOTS_PER_STEP selected blocks are gathered into one key tile per step (fewer, larger steps);
the own block (causal) comes last.

TQ queries over TK keys, query i at key position Q_OFF + i: a plain batch has Q_OFF = 0 and
TQ = TK; a sequence-parallel shard (or queries after cached keys) has an offset. Causal masking,
the window and the own block use that position; q, o, lse and the selection are indexed by i.

Packed documents (PACKED, Q_OFF = 0, TQ = TK): block ids are virtual blocks, one per (document,
block of it), and `table` (3, W) int32 gives each virtual block's first key (row 0) and end (row 1),
and each token's own virtual block (row 2); launch.packed_block_table builds it. Without packing,
block j is keys j * BLOCK ... cut at TK.

Naming: i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ tiles (shape in the comment).
"""

import triton
import triton.language as tl

from nsa_core.kernels.grid import split_pid
from nsa_core.kernels.online_softmax import online_softmax_step


@triton.jit
def block_keys(blk, m_blk, o_in, TK, table, W, BLOCK: tl.constexpr, PACKED: tl.constexpr):
    """Keys o_in of blocks blk (same shapes) and their mask: in the block and in the sequence."""
    if PACKED:
        b_first = tl.load(table + blk, mask=m_blk, other=0)
        o_key = b_first + o_in
        m_key = m_blk & (o_in < BLOCK) & (o_key < tl.load(table + W + blk, mask=m_blk, other=0))
    else:
        o_key = blk * BLOCK + o_in
        m_key = m_blk & (o_in < BLOCK) & (o_key < TK)
    return o_key, m_key


@triton.jit
def slot_keys(idx, gates, p_sel, step, t, TK, table, W,
              S: tl.constexpr, SLOTS_PER_STEP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_GATES: tl.constexpr, WINDOW: tl.constexpr, PACKED: tl.constexpr):
    """Key positions, mask and logit gate of the tile holding slots step ... step + SLOTS_PER_STEP - 1,
    for the query at key position t."""
    o_n = tl.arange(0, SLOTS_PER_STEP * BLOCK_N)
    o_slot = step + o_n // BLOCK_N
    o_in = o_n % BLOCK_N
    m_slot = o_slot < S
    b_blk = tl.load(idx + p_sel + o_slot, mask=m_slot, other=-1)  # [N]: the block of each column
    o_key, m_key = block_keys(b_blk, m_slot & (b_blk >= 0), o_in, TK, table, W, BLOCK, PACKED)
    if CAUSAL:
        m_key = m_key & (o_key <= t)
    if WINDOW > 0:
        m_key = m_key & (o_key >= t - WINDOW)
    b_gate = tl.full([SLOTS_PER_STEP * BLOCK_N], 1.0, dtype=tl.float32)
    if HAS_GATES:
        b_gate = tl.load(gates + p_sel + o_slot, mask=m_slot, other=0.0).to(tl.float32)
    return o_key, m_key, b_gate


@triton.jit
def own_block_keys(t, TK, table, W, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
                   PACKED: tl.constexpr):
    """The keys of the own block of the query at key position t (packed: t is also its token)."""
    o_in = tl.arange(0, BLOCK_N)
    if PACKED:
        b_blk = tl.load(table + 2 * W + t + o_in * 0)  # [N]: the token's own virtual block
        o_key, m_key = block_keys(b_blk, o_in < BLOCK, o_in, TK, table, W, BLOCK, PACKED)
    else:
        o_key, m_key = block_keys(t // BLOCK, o_in < BLOCK, o_in, TK, table, W, BLOCK, PACKED)
    m_key = m_key & (o_key <= t)
    if WINDOW > 0:
        m_key = m_key & (o_key >= t - WINDOW)
    return o_key, m_key, tl.full([BLOCK_N], 1.0, dtype=tl.float32)


@triton.jit
def _attend_keys(b_q, b_m, b_l, b_acc, p_k, p_v, stride_kt, stride_vt, o_key, m_key, b_gate, scale,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, PRECISION: tl.constexpr):
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    b_k = tl.load(p_k + o_key[:, None] * stride_kt + o_d[None, :], mask=m_key[:, None] & (o_d[None, :] < D), other=0.0)  # [N, BLOCK_D]
    b_v = tl.load(p_v + o_key[:, None] * stride_vt + o_dv[None, :], mask=m_key[:, None] & (o_dv[None, :] < DV), other=0.0)  # [N, BLOCK_DV]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * (scale * b_gate)[None, :]  # [ROWS_P, N]
    b_s = tl.where(m_key[None, :], b_s, float("-inf"))
    return online_softmax_step(b_m, b_l, b_acc, b_s, b_v, PRECISION)


@triton.jit
def selected_attention_fwd_kernel(
    q, k, v, idx, gates, o, lse, table, W,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    TQ, TK, Q_OFF, HI, scale,
    S: tl.constexpr, SLOTS_PER_STEP: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, ROWS_P: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATES: tl.constexpr,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr,
):
    i_t, i_bh = split_pid(TQ)  # the query (at key position Q_OFF + i_t), then (batch, selection head)
    i_bh = i_bh.to(tl.int64)  # 64-bit: (batch, head) offsets pass 2**31 elements (64 heads x 1M tokens x 128)
    i_b = (i_bh // HI).to(tl.int64)  # 64-bit: batch offsets pass 2**31 elements
    i_hs = i_bh % HI
    i_hq0 = i_hs * ROWS  # first query head of this program
    i_hk = i_hq0 // G
    o_r = tl.arange(0, ROWS_P)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_r = o_r < ROWS

    p_q = q + i_b * stride_qb + (i_hq0 + o_r)[:, None] * stride_qh + i_t * stride_qt + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)  # [ROWS_P, BLOCK_D]
    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh

    b_m = tl.full([ROWS_P], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([ROWS_P], dtype=tl.float32)
    b_acc = tl.zeros([ROWS_P, BLOCK_DV], dtype=tl.float32)

    t_pos = Q_OFF + i_t
    p_sel = (i_bh * TQ + i_t) * S  # row of idx / gates, both (B, HI, TQ, S) contiguous
    for step in range(0, S, SLOTS_PER_STEP):
        o_key, m_key, b_gate = slot_keys(idx, gates, p_sel, step, t_pos, TK, table, W, S, SLOTS_PER_STEP, BLOCK, BLOCK_N,
                                         CAUSAL, HAS_GATES, WINDOW, PACKED)
        b_m, b_l, b_acc = _attend_keys(b_q, b_m, b_l, b_acc, p_k, p_v, stride_kt, stride_vt, o_key, m_key, b_gate, scale,
                                       BLOCK_D, BLOCK_DV, D, DV, PRECISION)
    if CAUSAL:
        o_key, m_key, b_gate = own_block_keys(t_pos, TK, table, W, BLOCK, BLOCK_N, WINDOW, PACKED)
        b_m, b_l, b_acc = _attend_keys(b_q, b_m, b_l, b_acc, p_k, p_v, stride_kt, stride_vt, o_key, m_key, b_gate, scale,
                                       BLOCK_D, BLOCK_DV, D, DV, PRECISION)

    b_has = b_l > 0
    b_out = b_acc / tl.where(b_has, b_l, 1.0)[:, None]
    b_lse = tl.where(b_has, b_m + tl.log(tl.where(b_has, b_l, 1.0)), float("inf"))
    p_o = o + i_b * stride_ob + (i_hq0 + o_r)[:, None] * stride_oh + i_t * stride_ot + o_dv[None, :]
    tl.store(p_o, b_out.to(o.dtype.element_ty), mask=m_r[:, None] & (o_dv[None, :] < DV))
    p_lse = lse + (i_b * (HI * ROWS) + i_hq0 + o_r) * TQ + i_t  # lse (B, HQ, TQ) contiguous
    tl.store(p_lse, b_lse, mask=m_r)
