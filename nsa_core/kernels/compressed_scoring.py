"""The compressed branch and the selection's block scores in one Triton kernel (forward only).

One program holds BLOCK_T queries x all G query heads of one kv head (the group-centric layout of
the selected-block kernels): rows r = t * GP + g (GP = G rounded up to a power of two, rows of the
padding heads masked), so a group's scores are reduced inside the program. Two sweeps over the
compressed keys of that kv head:
1. attention: the M memory tokens (one tile), then the compressed blocks the tile's last query can
   see, in tiles of BLOCK_C, through the shared online softmax (kernels/online_softmax.py) -> the
   output and its log-sum-exp (memory tokens included). With SUMMED the same sweep keeps a second
   running max / sum over the compressed blocks alone: the softmax that the paper's p_cmp is
   (reference/selection.summed_block_probs normalises over the visible compressed blocks only).
2. scores: for each run of J selection blocks the compressed blocks they overlap (one tile of
   BLOCK_C from the run's first, J * r + E <= BLOCK_C of them) again: q . k (unscaled) or, with
   SUMMED, exp(scale q . k - lse_c) (0 where invisible); mapped to selection blocks by one dot with
   the 0/1 overlap matrix W [BLOCK_C, BLOCK_J] (mean: the r blocks of the selection block; summed:
   reference/selection.overlapping_compressed_blocks' rule, r + E blocks); then summed over the
   group's heads (SHARE) -> mean_logits: the sum / (G r) (the pooled score (mean q) . (mean k)
   that reference/pooled_selection.py computes), summed_probs: log of the summed probabilities.
   Blocks a query may not select (causal: not wholly before it; MASK_OWN: its own block) get -inf,
   as do the blocks past what the tile's last query sees (stored without the second sweep).
The scores then go to kernels/block_topk.py, which masks, softmaxes with the null slot and takes
the top-k (forced blocks included) as it does today. The top-k is not fused (a design choice, not
measured on a GPU): it needs every block's score of a row at once (the softmax's sum, then k
passes of max), while the sweep produces them J at a time; holding NB scores per row beside the
attention state would take the registers the sweeps need, or a third pass. The scores are
(B, H, T, NB): per kv head (not per query head) and 1 / r of the (T x C) logits; the op writes them
one query chunk at a time.

Grid: one program per (query tile, batch, kv head), flattened on the first axis (grid.split_pid, the
query tiles fastest). Each program reads its R rows of q once; K and V of its kv head over the
memory tokens and the compressed blocks its last query sees (sweep 1); K again over the blocks of the
selection blocks it scores (sweep 2; a run re-reads the E blocks its neighbour's run also read).
Plain rows only: packed documents (cu_seqlens) are not read here (ops/compressed_selection.py sends
them to the two-op path).

Numerics: logits, probabilities and the overlap sums in float32 (the PyTorch paths round the
logits to the inputs' dtype first); the scores are rounded to it once, at the store. Under the
interpreter bfloat16 tiles are upcast before the dots (_tile), so the probabilities of the value
dot are not rounded to bfloat16 there, as they are on a GPU.

Naming: i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ tiles (shape in the comment).
Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, GP = G padded to a power of
two, R = BLOCK_T x GP rows of a program, T queries (query i at position Q_OFF + i), M memory tokens,
C compressed blocks, NB = C // r selection blocks, r = SEL / STRIDE, E overlap beyond r (summed),
J selection blocks per scoring step, H heads of the scores (HKV with SHARE, else HQ), D / DV head dims.
"""

import triton
import triton.language as tl

from nsa_core.kernels.grid import split_pid
from nsa_core.kernels.online_softmax import online_softmax_step


@triton.jit
def _tile(p, stride_t, o_n, m_n, DIM: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """Rows o_n [N] of a (keys, DIM) matrix at p -> [N, BLOCK] (zeros where m_n is off or past DIM);
    UPCAST: in float32 (bfloat16 under Triton's interpreter, whose tl.dot multiplies bfloat16 bit
    patterns, triton-lang/triton#11584; the products of bfloat16 values are exact in float32)."""
    o_d = tl.arange(0, BLOCK)
    b_x = tl.load(p + o_n[:, None] * stride_t + o_d[None, :], mask=m_n[:, None] & (o_d[None, :] < DIM), other=0.0)
    return b_x.to(tl.float32) if UPCAST else b_x


@triton.jit
def _store_scores(SCORES, z, i_b, i_hk, i_t, o_j, j0, NB, T, Q_OFF, HQ, G, b_pos, m_r, o_t, o_h,
                  J: tl.constexpr, SEL: tl.constexpr, STRIDE: tl.constexpr, CAUSAL: tl.constexpr,
                  MASK_OWN: tl.constexpr, SUMMED: tl.constexpr, SHARE: tl.constexpr, FILL: tl.constexpr,
                  BLOCK_T: tl.constexpr, GP: tl.constexpr, BLOCK_J: tl.constexpr):
    """z [R, BLOCK_J]: overlap sums of blocks j0 + o_j for every row -> the scores (B, H, T, NB) of
    blocks j0 ... j0 + J - 1 (FILL: -inf everywhere, no z needed)."""
    o_jj = j0 + o_j  # [BLOCK_J]
    if SHARE:  # the group's heads summed: one row per query
        o_q = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        b_z = tl.sum(tl.reshape(z, (BLOCK_T, GP, BLOCK_J)), axis=1)  # [T_tile, BLOCK_J]
        pos = Q_OFF + o_q
        m_q = o_q < T
        row = (i_b * (HQ // G) + i_hk) * T + o_q
        per_head = G
    else:
        o_q, pos, m_q, b_z, per_head = o_t, b_pos, m_r, z, 1
        row = (i_b * HQ + o_h) * T + o_t
    if SUMMED:
        b_y = tl.where(b_z > 0, tl.log(tl.maximum(b_z, 1e-30)), float("-inf"))
    else:
        b_y = b_z / (per_head * (SEL // STRIDE))
    keep = tl.full(b_y.shape, 1, tl.int1)
    if CAUSAL:
        keep &= (o_jj[None, :] + 1) * SEL <= pos[:, None]
    if MASK_OWN:
        keep &= o_jj[None, :] != (pos // SEL)[:, None]
    if FILL:
        keep &= o_jj[None, :] < 0
    b_y = tl.where(keep, b_y, float("-inf"))
    m_s = m_q[:, None] & (o_jj < NB)[None, :] & (o_j < J)[None, :]
    tl.store(SCORES + row.to(tl.int64)[:, None] * NB + o_jj[None, :], b_y.to(SCORES.dtype.element_ty), mask=m_s)


@triton.jit
def compressed_scoring_kernel(
    Q, K, V, O, LSE, SCORES,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    T, C, NB, Q_OFF, HQ, G, num_t_tiles, scale,
    M: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, CMP: tl.constexpr, J: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_OWN: tl.constexpr, SUMMED: tl.constexpr, SHARE: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr, GP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr = False,
):
    i_t, i_bk = split_pid(num_t_tiles)
    i_bk = i_bk.to(tl.int64)
    HKV = HQ // G
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    o_r = tl.arange(0, BLOCK_T * GP)
    o_t, o_g = i_t * BLOCK_T + o_r // GP, o_r % GP
    m_r = (o_t < T) & (o_g < G)
    o_h = i_hk * G + o_g
    b_pos = Q_OFF + o_t  # [R]
    b_q = _tile(Q + i_b * stride_qb + o_h[:, None] * stride_qh, stride_qt, o_t, m_r, D, BLOCK_D, UPCAST)  # [R, BLOCK_D]
    p_k, p_v = K + i_b * stride_kb + i_hk * stride_kh, V + i_b * stride_vb + i_hk * stride_vh
    last = Q_OFF + tl.minimum(i_t * BLOCK_T + BLOCK_T, T) - 1  # the tile's last query

    # sweep 1: memory tokens, then the visible compressed blocks
    o_n = tl.arange(0, BLOCK_M)
    # (the memory tiles have their own names: a loop-carried tile keeps its shape on a GPU)
    b_km = _tile(p_k, stride_kt, o_n, o_n < M, D, BLOCK_D, UPCAST)  # [BLOCK_M, BLOCK_D]
    b_sm = tl.dot(b_q, tl.trans(b_km), input_precision=PRECISION) * scale
    b_sm = tl.where((o_n < M)[None, :], b_sm, float("-inf"))
    b_m = tl.full([BLOCK_T * GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_T * GP], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_T * GP, BLOCK_DV], dtype=tl.float32)
    b_vm = _tile(p_v, stride_vt, o_n, o_n < M, DV, BLOCK_DV, UPCAST)  # [BLOCK_M, BLOCK_DV]
    b_m, b_l, b_acc = online_softmax_step(b_m, b_l, b_acc, b_sm, b_vm, PRECISION)
    b_mc = tl.full([BLOCK_T * GP], float("-inf"), dtype=tl.float32)  # compressed blocks alone (SUMMED)
    b_lc = tl.zeros([BLOCK_T * GP], dtype=tl.float32)
    c_hi = tl.minimum(C, last // STRIDE) if CAUSAL else C
    for c0 in range(0, c_hi, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_k = _tile(p_k, stride_kt, M + o_c, m_c, D, BLOCK_D, UPCAST)  # [BLOCK_C, BLOCK_D]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale  # [R, BLOCK_C]
        vis = m_c[None, :]
        if CAUSAL:
            vis &= (o_c[None, :] + 1) * STRIDE <= b_pos[:, None]
        b_s = tl.where(vis, b_s, float("-inf"))
        b_v = _tile(p_v, stride_vt, M + o_c, m_c, DV, BLOCK_DV, UPCAST)  # [BLOCK_C, BLOCK_DV]
        b_m, b_l, b_acc = online_softmax_step(b_m, b_l, b_acc, b_s, b_v, PRECISION)
        if SUMMED:
            b_mc_new = tl.maximum(b_mc, tl.max(b_s, axis=1))
            b_base = tl.where(b_mc_new == float("-inf"), 0.0, b_mc_new)
            b_lc = b_lc * tl.exp(b_mc - b_base) + tl.sum(tl.exp(b_s - b_base[:, None]), axis=1)
            b_mc = b_mc_new
    o_dv = tl.arange(0, BLOCK_DV)
    p_o = O + i_b * stride_ob + o_h[:, None] * stride_oh + o_t[:, None] * stride_ot + o_dv[None, :]
    tl.store(p_o, (b_acc / b_l[:, None]).to(O.dtype.element_ty), mask=m_r[:, None] & (o_dv[None, :] < DV))
    tl.store(LSE + (i_b * HQ + o_h) * T + o_t, b_m + tl.log(b_l), mask=m_r)  # lse (B, HQ, T) contiguous

    # sweep 2: the selection blocks' scores, J blocks a step
    # the compressed blocks' own log-sum-exp; +inf where a row sees none (every p_cmp is then 0)
    b_lse_c = tl.where(b_lc > 0, b_mc + tl.log(tl.where(b_lc > 0, b_lc, 1.0)), float("inf"))
    o_j = tl.arange(0, BLOCK_J)
    nb_hi = tl.minimum(NB, last // SEL) if CAUSAL else NB
    for j0 in range(0, nb_hi, J):
        o_c = (j0 * SEL) // STRIDE + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_k = _tile(p_k, stride_kt, M + o_c, m_c, D, BLOCK_D, UPCAST)  # [BLOCK_C, BLOCK_D]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [R, BLOCK_C] unscaled
        if SUMMED:
            vis = m_c[None, :] & m_r[:, None]  # the padding heads' rows add nothing
            if CAUSAL:
                vis &= (o_c[None, :] + 1) * STRIDE <= b_pos[:, None]
            b_s = tl.where(vis, tl.exp(b_s * scale - b_lse_c[:, None]), 0.0)  # [R, BLOCK_C] p_cmp
        o_jj = j0 + o_j
        first = (o_jj * SEL) // STRIDE
        if SUMMED:  # reference/selection.overlapping_compressed_blocks
            hi = ((o_jj + 1) * SEL + CMP + STRIDE - 1) // STRIDE - 2
        else:
            hi = first + SEL // STRIDE - 1
        b_w = (o_c[:, None] >= first[None, :]) & (o_c[:, None] <= hi[None, :]) & m_c[:, None] & (o_j < J)[None, :]
        z = tl.dot(b_s, b_w.to(tl.float32), input_precision="ieee")  # [R, BLOCK_J]
        _store_scores(SCORES, z, i_b, i_hk, i_t, o_j, j0, NB, T, Q_OFF, HQ, G, b_pos, m_r, o_t, o_h, J, SEL, STRIDE,
                      CAUSAL, MASK_OWN, SUMMED, SHARE, False, BLOCK_T, GP, BLOCK_J)
    z = tl.zeros([BLOCK_T * GP, BLOCK_J], dtype=tl.float32)
    for j0 in range(tl.cdiv(nb_hi, J) * J, NB, J):  # blocks no query of the tile can select
        _store_scores(SCORES, z, i_b, i_hk, i_t, o_j, j0, NB, T, Q_OFF, HQ, G, b_pos, m_r, o_t, o_h, J, SEL, STRIDE,
                      CAUSAL, MASK_OWN, SUMMED, SHARE, True, BLOCK_T, GP, BLOCK_J)
