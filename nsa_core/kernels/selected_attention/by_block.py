"""Pieces shared by the kernels that walk one key block's queries (forward_by_block.py and the
dK/dV kernel of backward.py): the key block, its segment of the CSR entries, and the query rows
of a step (entries that selected the block, or the block's own queries).

TQ queries over TK keys, query i at key position Q_OFF + i (forward.py's docstring): a key block's
own queries are those whose position falls in it, none for the blocks before the first query.
Packed documents (PACKED, Q_OFF = 0): blk is a virtual block, whose keys `table` gives.

Naming: o_ offsets, m_ masks, p_ pointers, b_ tiles (shape in the comment).
"""

import triton
import triton.language as tl


@triton.jit
def _block_span(blk, o_n, TK, table, W, BLOCK: tl.constexpr, PACKED: tl.constexpr):
    """Keys o_n of block blk and their mask (in the block, in the sequence or its document)."""
    if PACKED:
        o_tok = tl.load(table + blk + o_n * 0) + o_n
        return o_tok, (o_n < BLOCK) & (o_tok < tl.load(table + W + blk + o_n * 0))
    o_tok = blk * BLOCK + o_n
    return o_tok, (o_n < BLOCK) & (o_tok < TK)


@triton.jit
def load_key_block(p_k, p_v, stride_kt, stride_vt, blk, TK,
                   BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr, table, W, PACKED: tl.constexpr):
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_key, m_key = _block_span(blk, o_n, TK, table, W, BLOCK, PACKED)
    b_k = tl.load(p_k + o_key[:, None] * stride_kt + o_d[None, :], mask=m_key[:, None] & (o_d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
    b_v = tl.load(p_v + o_key[:, None] * stride_vt + o_dv[None, :], mask=m_key[:, None] & (o_dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
    return o_key, m_key, b_k, b_v


@triton.jit
def segment_bounds(offsets, seg):
    """[start, end) of group seg's entries. Loaded as a pair and reduced to scalars: a scalar
    load would be a 1-element array in the interpreter, which a loop bound cannot take."""
    o_two = tl.arange(0, 2)
    b_bounds = tl.load(offsets + seg + o_two)
    return tl.sum(tl.where(o_two == 0, b_bounds, 0)), tl.sum(tl.where(o_two == 1, b_bounds, 0))


@triton.jit
def entry_rows(entries, pos, end, TQ, HI, S: tl.constexpr, ROWS: tl.constexpr, ROWS_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of the step at pos: BLOCK_M // ROWS_P entries, ROWS_P rows (query heads) each.
    Returns (lin: index into (B, HI, TQ, S), row mask, query, query head, slot), each [BLOCK_M]."""
    o_m = tl.arange(0, BLOCK_M)
    o_e = o_m // ROWS_P
    o_g = o_m % ROWS_P
    m_row = (pos + o_e < end) & (o_g < ROWS)
    lin = tl.load(entries + pos + o_e, mask=m_row, other=0)
    o_t = (lin // S) % TQ
    o_hq = (((lin // (S * TQ)) % HI) * ROWS + o_g).to(tl.int64)  # 64-bit: times the head stride (T x D)
    return lin, m_row, o_t, o_hq, lin % S


@triton.jit
def own_block_steps(blk, TQ, Q_OFF, BLOCK: tl.constexpr, PACKED: tl.constexpr):
    """[lo, hi): the offsets within block blk of its own queries (positions Q_OFF ... Q_OFF + TQ - 1),
    so that a block before the first query (a shard's earlier keys) walks no rows at all."""
    if PACKED:
        return 0, BLOCK
    first = blk * BLOCK
    return tl.maximum(Q_OFF - first, 0), tl.minimum(Q_OFF + TQ - first, BLOCK)


@triton.jit
def own_block_rows(blk, step, i_hk, TQ, TK, Q_OFF, G, BLOCK: tl.constexpr, G_P: tl.constexpr, BLOCK_M: tl.constexpr,
                   table, W, PACKED: tl.constexpr):
    """Rows of step `step` over the block's own queries: BLOCK_M // G_P keys of the block x the G
    query heads of kv head i_hk. Returns (query, its key position, row mask, query head), each [BLOCK_M]."""
    o_m = tl.arange(0, BLOCK_M)
    o_tt = o_m // G_P
    o_gg = o_m % G_P
    o_pos, m_t = _block_span(blk, step + o_tt, TK, table, W, BLOCK, PACKED)
    o_t = o_pos - Q_OFF
    m_row = m_t & (o_t >= 0) & (o_t < TQ) & (o_gg < G)
    return tl.where(m_row, o_t, 0), o_pos, m_row, i_hk * G + o_gg
