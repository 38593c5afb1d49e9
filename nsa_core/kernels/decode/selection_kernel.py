"""Triton kernel of a decoding step's compressed branch and block selection, fused: one program
attends the cache's compressed keys, scores the selection blocks from that same attention and
writes the top-k blocks (reference/step_selection.py and the paged compressed attention are the
twin; launch: compressed_selection.py).

One program = one query token of one row and one selection list: the G query heads of a kv group
(the group shares its blocks) or one query head (it does not), padded to BLOCK_R >= 16 rows for
tl.dot. It reads the row's visible compressed slots only (memory tokens, then the compressed blocks
completed before the query), through the row's page table, in tiles of BLOCK_N slots:
1. online softmax over the tile's logits -> the compressed output; with mean-logit importance the
   logits summed over the list's heads go to the program's scratch row (one float per compressed
   block); with summed probabilities the running max / sum over the compressed blocks only (no
   memory tokens: the selection's softmax leaves them out).
2. summed probabilities only: a second pass over the keys (the values are not read again)
   recomputes the logits, normalises them with the final max / sum and writes each compressed
   block's probability summed over the heads to the scratch row.
3. after a barrier (the scratch row is written and read by different threads of the program), one
   [BLOCK_NB, BLOCK_W] gather of the scratch row gives every selection block's logit: the mean over
   the heads and its compressed blocks, or the log of the probability summed over the compressed
   blocks that overlap it; blocks not wholly visible (mean) or with no visible overlap (summed) and
   the query's own block (selection blocks other than the stride) get -inf. Interpolated mean
   logits (selection blocks smaller than the stride) interpolate the compressed blocks' means to
   tokens as the reference does, an invisible block holding the reference's finite masked score.
4. softmax with the null slot, then the forced slots and the top-k of the rest, as the block top-k
   kernel (kernels/block_topk.py) does it, in the same program.
With mean-logit importance and too few lists to fill the GPU, the slots are split instead (as the
paged decode kernels split their lists): compressed_split_kernel runs step 1 over one range of slot
tiles per program, writing its partial softmax state and its compressed blocks' scores (disjoint
parts of the scratch row); selection_merge_kernel, one program per list, merges the partials into the
output and runs steps 3 and 4. Summed probabilities need the final max / sum of every head before
step 2, so they always take the one-program kernel.
Rounding as the twin: block logits rounded to the inputs' dtype, probabilities rounded to it before
the top-k; ties go to the lowest block index.

Naming: i_ program ids, o_ offsets, m_ masks, p_ pointers / pointer offsets, b_ tiles (shape in the
comment). Dimension legend: B batch, HQ query heads, HKV kv heads, HI lists (HKV or HQ), ROWS = HQ /
HI heads per list, K query tokens, M memory tokens, C compressed blocks in the capacity, NB selection
blocks in it, N = BLOCK_N slots per tile, W compressed blocks read per selection block, S slots out.
"""

import triton
import triton.language as tl

from nsa_core.kernels.block_topk import forced_block
from nsa_core.kernels.online_softmax import online_softmax_step

MEAN_LOGITS = tl.constexpr(0)
SUMMED_PROBS = tl.constexpr(1)


@triton.jit
def _slot_logits(b_q, p_k, table, p_table, t, b_hi, stride_kp, stride_kt, scale, CPAGE: tl.constexpr,
                 BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Slots t * N ... of a row (logical slot j: page j // CPAGE, offset j % CPAGE): their indices [N],
    physical pages [N] int64, in-page offsets [N], visibility [N] (j <= hi) and the scaled logits
    [BLOCK_R, N] (-inf where invisible)."""
    o_j = t * BLOCK_N + tl.arange(0, BLOCK_N)
    m_j = o_j <= b_hi
    b_phys = tl.load(table + p_table + o_j // CPAGE, mask=m_j, other=0).to(tl.int64)  # [N]
    o_in = o_j % CPAGE
    o_d = tl.arange(0, BLOCK_D)
    p_kt = p_k + b_phys[:, None] * stride_kp + o_in[:, None] * stride_kt + o_d[None, :]
    b_k = tl.load(p_kt, mask=m_j[:, None] & (o_d[None, :] < D), other=0.0)  # [N, BLOCK_D]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale  # [BLOCK_R, N]
    return o_j, b_phys, o_in, m_j, tl.where(m_j[None, :], b_s, float("-inf"))


@triton.jit
def _interpolated_logits(p_scr, b_last, C, ROWS, masked, STRIDE: tl.constexpr, SEL: tl.constexpr,
                         BLOCK_NB: tl.constexpr, BLOCK_W: tl.constexpr):
    """Selection blocks smaller than the stride, interpolated (reference.selection.block_importance):
    the mean logits of the compressed blocks (an invisible one, and one past the last, `masked`)
    linearly interpolated to tokens (align_corners=False), averaged over each block's SEL tokens."""
    o_t = tl.arange(0, BLOCK_NB)[:, None] * SEL + tl.arange(0, BLOCK_W)[None, :]  # [BLOCK_NB, BLOCK_W] tokens
    b_src = tl.maximum((o_t.to(tl.float32) + 0.5) / STRIDE - 0.5, 0.0)
    o_i0 = b_src.to(tl.int32)  # floor: b_src >= 0
    o_i1 = tl.minimum(o_i0 + 1, C)
    b_lam = b_src - o_i0.to(tl.float32)
    m_t = tl.arange(0, BLOCK_W)[None, :] < SEL
    b_x0 = tl.where(o_i0 <= b_last, tl.load(p_scr + o_i0, mask=m_t & (o_i0 <= b_last), other=0.0) / ROWS, masked)
    b_x1 = tl.where(o_i1 <= b_last, tl.load(p_scr + o_i1, mask=m_t & (o_i1 <= b_last), other=0.0) / ROWS, masked)
    return tl.sum(tl.where(m_t, (b_x0 * (1 - b_lam) + b_x1 * b_lam) / SEL, 0.0), axis=1)


@triton.jit
def _block_logits(p_scr, b_pos, NB, C, ROWS, masked, STRIDE: tl.constexpr, SEL: tl.constexpr,
                  CBLOCK: tl.constexpr, IMPORTANCE: tl.constexpr, INTERPOLATED: tl.constexpr,
                  BLOCK_NB: tl.constexpr, BLOCK_W: tl.constexpr):
    """Every selection block's logit [BLOCK_NB] (float32, -inf where masked) from the scratch row."""
    o_nb = tl.arange(0, BLOCK_NB)
    o_w = tl.arange(0, BLOCK_W)
    b_last = b_pos // STRIDE - 1  # the last compressed block the query sees (-1: none)
    if IMPORTANCE == MEAN_LOGITS and INTERPOLATED:
        b_x = _interpolated_logits(p_scr, b_last, C, ROWS, masked, STRIDE, SEL, BLOCK_NB, BLOCK_W)
    elif IMPORTANCE == MEAN_LOGITS:
        if SEL >= STRIDE:  # the SEL // STRIDE compressed blocks of the block
            width = SEL // STRIDE
            o_col = o_nb[:, None] * width + o_w[None, :]  # [BLOCK_NB, BLOCK_W]
        else:  # the one compressed block the block lies in (its score repeated)
            width = 1
            o_col = (o_nb // (STRIDE // SEL))[:, None] + o_w[None, :]
        m_col = (o_w[None, :] < width) & (o_col <= b_last) & (o_nb[:, None] < NB)
        b_sum = tl.sum(tl.load(p_scr + o_col, mask=m_col, other=0.0), axis=1)
        seen = tl.sum(m_col.to(tl.int32), axis=1) == width  # every compressed block of it visible
        b_x = tl.where(seen, b_sum / (ROWS * width), float("-inf"))
    else:  # the compressed blocks overlapping the block (reference.selection.overlapping_compressed_blocks)
        o_first = (o_nb * SEL) // STRIDE
        o_end = ((o_nb + 1) * SEL + CBLOCK + STRIDE - 1) // STRIDE - 2  # the last one, inclusive
        o_col = o_first[:, None] + o_w[None, :]
        m_col = (o_col <= o_end[:, None]) & (o_col < C) & (o_col <= b_last) & (o_nb[:, None] < NB)
        b_sum = tl.sum(tl.load(p_scr + o_col, mask=m_col, other=0.0), axis=1)
        b_x = tl.where(b_sum > 0, tl.log(tl.maximum(b_sum, 1e-30)), float("-inf"))
    if SEL != STRIDE:
        b_x = tl.where(o_nb == b_pos // SEL, float("-inf"), b_x)
    return tl.where(o_nb < NB, b_x, float("-inf"))


@triton.jit
def _store_sorted_top(b_p, o_nb, p_out, indices, probs, valid, threshold, FREE: tl.constexpr, TOPK_P: tl.constexpr):
    """The FREE best of b_p [BLOCK_NB] (ties: the lowest index) into FREE slots at p_out, best first. A key is the
    float32 bits of the probability (monotonic for p >= 0; the -1 padding sorts below every p >= 0) above the
    complemented block index, so one descending top-k of the keys is the slot loop's order."""
    bits = b_p.to(tl.int32, bitcast=True).to(tl.int64)
    low = 4294967295  # 2**32 - 1
    keys = (bits << 32) | (low - o_nb.to(tl.int64))
    top = tl.topk(keys, TOPK_P)  # [TOPK_P], descending
    o_s = tl.arange(0, TOPK_P)
    m_s = o_s < FREE
    choice = low - (top & low)
    best = (top >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    tl.store(indices + p_out + o_s, choice, mask=m_s)
    tl.store(probs + p_out + o_s, best.to(probs.dtype.element_ty), mask=m_s)
    tl.store(valid + p_out + o_s, (best > threshold).to(tl.int8), mask=m_s)


@triton.jit
def _store_top_blocks(b_p, b_pos, NB, p_out, indices, probs, valid, threshold, SEL: tl.constexpr,
                      SLOTS: tl.constexpr, FORCED_I: tl.constexpr, FORCED_L: tl.constexpr, BLOCK_NB: tl.constexpr,
                      TOPK_P: tl.constexpr):
    """Probabilities b_p [BLOCK_NB] -> SLOTS slots at p_out: the forced blocks first (validity: they
    exist), then the best unforced blocks (ties: the lowest index), valid above threshold. TOPK_P = 0:
    one max and one min reduction per slot; TOPK_P (a power of two >= the unforced slots): one tl.topk of
    int64 keys (the probability's bits over the complemented index: the same order, ties included)."""
    o_nb = tl.arange(0, BLOCK_NB)
    own = b_pos // SEL
    score_dtype = probs.dtype.element_ty
    for j in tl.static_range(FORCED_I + FORCED_L):
        chosen, forced_valid = forced_block(j, own, FORCED_I, NB)
        value = tl.sum(tl.where(o_nb == chosen, b_p, 0.0), axis=0)
        tl.store(indices + p_out + j, chosen.to(tl.int64))
        tl.store(probs + p_out + j, value.to(score_dtype))
        tl.store(valid + p_out + j, forced_valid.to(tl.int8))
    if FORCED_I + FORCED_L > 0:  # the other slots rank the unforced blocks
        forced = ((o_nb < FORCED_I) | (o_nb >= own - FORCED_L)) & (o_nb < own)
        b_p = tl.where(forced, 0.0, b_p)
    b_p = tl.where(o_nb < NB, b_p, -1.0)  # no block there: never chosen (SLOTS - forced <= NB)
    if TOPK_P > 0:
        _store_sorted_top(b_p, o_nb, p_out + FORCED_I + FORCED_L, indices, probs, valid, threshold,
                          SLOTS - FORCED_I - FORCED_L, TOPK_P)
    else:
        for slot in tl.static_range(FORCED_I + FORCED_L, SLOTS):
            best = tl.max(b_p, axis=0)
            choice = tl.min(tl.where(b_p == best, o_nb, BLOCK_NB), axis=0)
            b_p = tl.where(o_nb == choice, -2.0, b_p)
            tl.store(indices + p_out + slot, choice.to(tl.int64))
            tl.store(probs + p_out + slot, best.to(score_dtype))
            tl.store(valid + p_out + slot, (best > threshold).to(tl.int8))


@triton.jit
def _list_query(q, positions, stride_qb, stride_qh, stride_qt, HI, K, ROWS, M: tl.constexpr, STRIDE: tl.constexpr,
                BLOCK_R: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program i_bik's list: (i_b int64, i_k, i_hi, row mask [BLOCK_R], query heads [BLOCK_R], the
    query tile [BLOCK_R, BLOCK_D], its position, the last visible slot)."""
    i_bik = tl.program_id(0)  # over (batch, list, token), tokens fastest
    i_k = i_bik % K
    i_hi = (i_bik // K) % HI
    i_b = (i_bik // (K * HI)).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R)  # [BLOCK_R] rows: heads of the list
    m_r = o_r < ROWS
    o_hq = i_hi * ROWS + o_r
    o_d = tl.arange(0, BLOCK_D)
    p_q = q + i_b * stride_qb + o_hq[:, None] * stride_qh + i_k * stride_qt + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)  # [BLOCK_R, BLOCK_D]
    b_pos = tl.load(positions + i_b * K + i_k)
    return i_b, i_k, i_hi, m_r, o_hq, b_q, b_pos, M + b_pos // STRIDE - 1


@triton.jit
def _attend_slots(b_q, m_r, p_k, p_v, table, p_table, p_scr, t_lo, t_hi, b_hi, stride_kp, stride_kt, stride_vp,
                  stride_vt, scale, M: tl.constexpr, IMPORTANCE: tl.constexpr, CPAGE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Step 1 over the slot tiles t_lo ... t_hi - 1: the online softmax (m, l, acc) of the list's rows,
    the mean-logit scores written to the scratch row, and with summed probabilities the running
    max / sum over the compressed blocks (mc, lc)."""
    o_dv = tl.arange(0, BLOCK_DV)
    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    b_mc = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)  # over the compressed blocks only
    b_lc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        o_j, b_phys, o_in, m_j, b_s = _slot_logits(b_q, p_k, table, p_table, t, b_hi, stride_kp, stride_kt, scale,
                                                   CPAGE, BLOCK_N, D, BLOCK_D, PRECISION)
        p_vt = p_v + b_phys[:, None] * stride_vp + o_in[:, None] * stride_vt + o_dv[None, :]
        b_v = tl.load(p_vt, mask=m_j[:, None] & (o_dv[None, :] < DV), other=0.0)  # [N, BLOCK_DV]
        b_m, b_l, b_acc = online_softmax_step(b_m, b_l, b_acc, b_s, b_v, PRECISION)
        m_col = m_j & (o_j >= M)  # [N] the tile's visible compressed blocks
        if IMPORTANCE == MEAN_LOGITS:
            tl.store(p_scr + o_j, tl.sum(tl.where(m_r[:, None], b_s, 0.0), axis=0), mask=m_col)
        else:
            b_sc = tl.where(m_col[None, :], b_s, float("-inf"))
            b_mc_new = tl.maximum(b_mc, tl.max(b_sc, axis=1))
            b_base = tl.where(b_mc_new == float("-inf"), 0.0, b_mc_new)
            b_lc = b_lc * tl.exp(b_mc - b_base) + tl.sum(tl.exp(b_sc - b_base[:, None]), axis=1)
            b_mc = b_mc_new
    return b_m, b_l, b_acc, b_mc, b_lc


@triton.jit
def _select_from_scratch(p_scr, b_pos, p_out, indices, probs, valid, NB, C, ROWS, masked, null_logit, threshold,
                         STRIDE: tl.constexpr, SEL: tl.constexpr, CBLOCK: tl.constexpr, IMPORTANCE: tl.constexpr,
                         INTERPOLATED: tl.constexpr, SLOTS: tl.constexpr, FORCED_I: tl.constexpr,
                         FORCED_L: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_W: tl.constexpr,
                         TOPK_P: tl.constexpr):
    """Steps 3 and 4: the scratch row (indexed by compressed block) -> the SLOTS choices at p_out."""
    score_dtype = probs.dtype.element_ty
    b_x = _block_logits(p_scr, b_pos, NB, C, ROWS, masked, STRIDE, SEL, CBLOCK, IMPORTANCE, INTERPOLATED,
                        BLOCK_NB, BLOCK_W)
    b_x = b_x.to(score_dtype).to(tl.float32)
    b_top = tl.maximum(tl.max(b_x, axis=0), null_logit)
    b_e = tl.exp(b_x - b_top)
    b_p = (b_e / (tl.sum(b_e, axis=0) + tl.exp(null_logit - b_top))).to(score_dtype).to(tl.float32)
    _store_top_blocks(b_p, b_pos, NB, p_out, indices, probs, valid, threshold, SEL, SLOTS, FORCED_I, FORCED_L,
                      BLOCK_NB, TOPK_P)


@triton.jit
def compressed_selection_kernel(
    q, ck_pages, cv_pages, table, positions, o, scratch, indices, probs, valid,
    stride_qb, stride_qh, stride_qt, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt, stride_table,
    HQ, HI, K, ROWS, LISTS_PER_KV, C, NB, scale, threshold, null_logit, masked,
    M: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, CBLOCK: tl.constexpr, IMPORTANCE: tl.constexpr,
    INTERPOLATED: tl.constexpr,
    SLOTS: tl.constexpr, FORCED_I: tl.constexpr, FORCED_L: tl.constexpr, CPAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_NB: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr, TOPK_P: tl.constexpr = 0,
):
    """One program per list, every slot. positions (B, K) int64; o (B, HQ, K, DV), scratch
    (B * HI * K, C) float32, indices / probs / valid (B, HI, K, SLOTS), all contiguous."""
    i_b, i_k, i_hi, m_r, o_hq, b_q, b_pos, b_hi = _list_query(q, positions, stride_qb, stride_qh, stride_qt, HI, K,
                                                               ROWS, M, STRIDE, BLOCK_R, D, BLOCK_D)
    i_bik = tl.program_id(0).to(tl.int64)
    i_hkv = i_hi // LISTS_PER_KV
    p_k = ck_pages + i_hkv * stride_kh
    p_v = cv_pages + i_hkv * stride_vh
    p_table = i_b * stride_table
    p_scr = scratch + i_bik * C - M  # indexed by slot: compressed block c at slot M + c
    o_dv = tl.arange(0, BLOCK_DV)
    tiles = tl.cdiv(b_hi + 1, BLOCK_N)
    b_m, b_l, b_acc, b_mc, b_lc = _attend_slots(b_q, m_r, p_k, p_v, table, p_table, p_scr, 0, tiles, b_hi,
                                                stride_kp, stride_kt, stride_vp, stride_vt, scale, M, IMPORTANCE,
                                                CPAGE, BLOCK_N, BLOCK_R, D, DV, BLOCK_D, BLOCK_DV, PRECISION)
    o_rows = (i_b * HQ + o_hq) * K + i_k  # [BLOCK_R] rows of (B, HQ, K), 64-bit
    b_out = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    tl.store(o + o_rows[:, None] * DV + o_dv[None, :], b_out.to(o.dtype.element_ty),
             mask=m_r[:, None] & (o_dv[None, :] < DV))

    if IMPORTANCE == SUMMED_PROBS:  # each compressed block's probability, summed over the list's heads
        b_base = tl.where(b_mc == float("-inf"), 0.0, b_mc)
        b_inv = tl.where(m_r & (b_lc > 0), 1.0 / tl.where(b_lc > 0, b_lc, 1.0), 0.0)
        for t in range(M // BLOCK_N, tiles):
            o_j, b_phys, o_in, m_j, b_s = _slot_logits(b_q, p_k, table, p_table, t, b_hi, stride_kp, stride_kt,
                                                       scale, CPAGE, BLOCK_N, D, BLOCK_D, PRECISION)
            b_p = tl.exp(b_s - b_base[:, None]) * b_inv[:, None]  # [BLOCK_R, N]
            tl.store(p_scr + o_j, tl.sum(b_p, axis=0), mask=m_j & (o_j >= M))
    tl.debug_barrier()  # the scratch row, written above by other threads of the program
    _select_from_scratch(p_scr + M, b_pos, i_bik * SLOTS, indices, probs, valid, NB, C, ROWS, masked, null_logit,
                         threshold, STRIDE, SEL, CBLOCK, IMPORTANCE, INTERPOLATED, SLOTS, FORCED_I, FORCED_L,
                         BLOCK_NB, BLOCK_W, TOPK_P)


@triton.jit
def compressed_split_kernel(
    q, ck_pages, cv_pages, table, positions, o_part, m_part, l_part, scratch,
    stride_qb, stride_qh, stride_qt, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt, stride_table,
    HQ, HI, K, ROWS, LISTS_PER_KV, C, scale, tiles_per_split, NUM_SPLITS,
    M: tl.constexpr, STRIDE: tl.constexpr, CPAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Mean-logit importance, the slots split (program (list, split)): step 1 over the split's
    tiles, its partial (m, l, acc) per row written to m_part / l_part (B * HQ * K, NUM_SPLITS) and
    o_part (B * HQ * K, NUM_SPLITS, DV) float32, its compressed blocks' scores to the scratch row."""
    i_b, i_k, i_hi, m_r, o_hq, b_q, b_pos, b_hi = _list_query(q, positions, stride_qb, stride_qh, stride_qt, HI, K,
                                                               ROWS, M, STRIDE, BLOCK_R, D, BLOCK_D)
    i_split = tl.program_id(1)
    i_bik = tl.program_id(0).to(tl.int64)
    i_hkv = i_hi // LISTS_PER_KV
    t_lo = i_split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(b_hi + 1, BLOCK_N))  # no tile past the last visible slot
    b_m, b_l, b_acc, _, _ = _attend_slots(b_q, m_r, ck_pages + i_hkv * stride_kh, cv_pages + i_hkv * stride_vh, table,
                                          i_b * stride_table, scratch + i_bik * C - M, t_lo, t_hi, b_hi, stride_kp,
                                          stride_kt, stride_vp, stride_vt, scale, M, MEAN_LOGITS, CPAGE, BLOCK_N,
                                          BLOCK_R, D, DV, BLOCK_D, BLOCK_DV, PRECISION)
    o_dv = tl.arange(0, BLOCK_DV)
    p_part = ((i_b * HQ + o_hq) * K + i_k) * NUM_SPLITS + i_split  # [BLOCK_R]
    tl.store(o_part + p_part[:, None] * DV + o_dv[None, :], b_acc, mask=m_r[:, None] & (o_dv[None, :] < DV))
    tl.store(m_part + p_part, b_m, mask=m_r)
    tl.store(l_part + p_part, b_l, mask=m_r)


@triton.jit
def selection_merge_kernel(
    positions, o_part, m_part, l_part, scratch, o, indices, probs, valid,
    HQ, HI, K, ROWS, C, NB, NUM_SPLITS, threshold, null_logit, masked,
    STRIDE: tl.constexpr, SEL: tl.constexpr, CBLOCK: tl.constexpr, INTERPOLATED: tl.constexpr,
    SLOTS: tl.constexpr, FORCED_I: tl.constexpr, FORCED_L: tl.constexpr, BLOCK_R: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_W: tl.constexpr,
    TOPK_P: tl.constexpr = 0,
):
    """After compressed_split_kernel, one program per list: its rows' partials merged into o
    (out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s; zeros where no split saw a slot), then
    steps 3 and 4 on the scratch row the splits wrote."""
    i_bik = tl.program_id(0)
    i_k = i_bik % K
    i_hi = (i_bik // K) % HI
    i_b = (i_bik // (K * HI)).to(tl.int64)
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < ROWS
    o_dv = tl.arange(0, BLOCK_DV)
    o_rows = (i_b * HQ + i_hi * ROWS + o_r) * K + i_k  # [BLOCK_R]
    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        p_part = o_rows * NUM_SPLITS + s
        b_ms = tl.load(m_part + p_part, mask=m_r, other=float("-inf"))
        b_m_new = tl.maximum(b_m, b_ms)
        b_base = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_ws, b_alpha = tl.exp(b_ms - b_base), tl.exp(b_m - b_base)  # 0 for a split (or a past) that saw nothing
        b_l = b_l * b_alpha + b_ws * tl.load(l_part + p_part, mask=m_r, other=0.0)
        b_accs = tl.load(o_part + p_part[:, None] * DV + o_dv[None, :], mask=m_r[:, None] & (o_dv[None, :] < DV),
                         other=0.0)
        b_acc = b_acc * b_alpha[:, None] + b_accs * b_ws[:, None]
        b_m = b_m_new
    b_out = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    tl.store(o + o_rows[:, None] * DV + o_dv[None, :], b_out.to(o.dtype.element_ty),
             mask=m_r[:, None] & (o_dv[None, :] < DV))
    b_pos = tl.load(positions + i_b * K + i_k)
    _select_from_scratch(scratch + i_bik.to(tl.int64) * C, b_pos, i_bik.to(tl.int64) * SLOTS, indices, probs, valid,
                         NB, C, ROWS, masked, null_logit, threshold, STRIDE, SEL, CBLOCK, MEAN_LOGITS, INTERPOLATED,
                         SLOTS, FORCED_I, FORCED_L, BLOCK_NB, BLOCK_W, TOPK_P)
