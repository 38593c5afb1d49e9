"""Triton kernels of paged split-K ("flash-decoding") attention over lists of key blocks.

Split kernel: one program = one query token of one sequence, one list of logical pages, a tile of
BLOCK_R of the query heads that share the list (all G heads of a kv group, or one head; padded to
16 rows or more for tl.dot, masked), and one split: a contiguous range of the list's slots. It
walks its slots in key tiles of BLOCK_N keys (TILE_PAGES small pages gathered into one tile, or a
large page in CHUNKS tiles), maps each logical page to its physical page through the block table,
and loads keys and values only for valid slots and visible keys (lo <= index <= hi), with an
online softmax in float32. One split writes the output; several write their partial (m, l, acc),
and the merge kernel combines each row's splits.

How a list names its pages (LISTS, a compile-time rule, so a decoding step builds no page list with
tensor ops): LISTED, the S slots of `blocks` / `valid`; LISTED_AND_OWN, those S - 1 listed slots and
then the query's own page hi // PAGE (the selected branch: its blocks and the block it sits in);
WINDOW_PAGES, the pages from max(hi - WINDOW, 0) // PAGE up to hi // PAGE with keys from hi - WINDOW
on (the sliding window; no `blocks`, S = WINDOW // PAGE + 2 slots).

Naming: i_ program ids, o_ offsets, m_ masks, p_ pointers / pointer offsets, b_ tiles (shape in
the comment).
Dimension legend: B batch, HQ query heads, HKV kv heads, HI lists (HKV or HQ), ROWS = HQ / HI
query heads per list, K query tokens, S slots per list, P physical pages, PAGE keys per page,
N = BLOCK_N keys per tile, D / DV head dims, NS splits.
"""

import triton
import triton.language as tl

from nsa_core.kernels.online_softmax import online_softmax_step


LISTED: tl.constexpr = tl.constexpr(0)
LISTED_AND_OWN: tl.constexpr = tl.constexpr(1)
WINDOW_PAGES: tl.constexpr = tl.constexpr(2)


@triton.jit
def _tile_keys(blocks, valid, block_table, p_list, p_table, step, chunk, end, max_pages, num_pages, b_lo, b_hi, S,
               PAGE: tl.constexpr, BLOCK_N: tl.constexpr, LISTS: tl.constexpr):
    """Key tile of slots step + n // PAGE at in-page offsets chunk * BLOCK_N + n % PAGE (n < N):
    physical pages [N] (int64), in-page offsets [N], visible keys [N]. p_list: the list's first
    slot in blocks / valid (rows of S slots; LISTED_AND_OWN: S - 1 listed slots per row)."""
    o_n = tl.arange(0, BLOCK_N)
    o_slot = step + o_n // PAGE
    o_in = chunk * BLOCK_N + o_n % PAGE
    m_slot = o_slot < end
    if LISTS == WINDOW_PAGES:
        b_page = tl.maximum(b_lo, 0) // PAGE + o_slot  # [N] logical page
        m_slot = m_slot & (b_page <= b_hi // PAGE)
    elif LISTS == LISTED_AND_OWN:
        m_own = m_slot & (o_slot == S - 1)
        m_listed = m_slot & (o_slot < S - 1)
        m_listed = m_listed & (tl.load(valid + p_list + o_slot, mask=m_listed, other=0) != 0)
        b_page = tl.load(blocks + p_list + o_slot, mask=m_listed, other=0)
        b_page = tl.where(m_own, b_hi // PAGE, b_page)
        m_slot = m_listed | m_own
    else:
        m_slot = m_slot & (tl.load(valid + p_list + o_slot, mask=m_slot, other=0) != 0)
        b_page = tl.load(blocks + p_list + o_slot, mask=m_slot, other=0)  # [N] logical page
    m_slot = m_slot & (b_page >= 0) & (b_page < max_pages)
    b_phys = tl.load(block_table + p_table + b_page, mask=m_slot, other=0).to(tl.int64)  # [N]
    o_key = b_page * PAGE + o_in  # [N] logical key index
    m_key = m_slot & (b_phys >= 0) & (b_phys < num_pages) & (o_key >= b_lo) & (o_key <= b_hi)
    return b_phys, o_in, m_key


@triton.jit
def _attend_tile(b_q, b_m, b_l, b_acc, p_k, p_v, b_phys, o_in, m_key, stride_kp, stride_kt, stride_vp, stride_vt, scale,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One online-softmax step over a key tile; nothing is loaded for keys outside m_key."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    p_kt = p_k + b_phys[:, None] * stride_kp + o_in[:, None] * stride_kt + o_d[None, :]
    b_k = tl.load(p_kt, mask=m_key[:, None] & (o_d[None, :] < D), other=0.0)  # [N, BLOCK_D]
    p_vt = p_v + b_phys[:, None] * stride_vp + o_in[:, None] * stride_vt + o_dv[None, :]
    b_v = tl.load(p_vt, mask=m_key[:, None] & (o_dv[None, :] < DV), other=0.0)  # [N, BLOCK_DV]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale  # [BLOCK_R, N]
    b_s = tl.where(m_key[None, :], b_s, float("-inf"))
    return online_softmax_step(b_m, b_l, b_acc, b_s, b_v, PRECISION)


@triton.jit
def attend_list(
    q, k_pages, v_pages, block_table, blocks, valid, hi, lo, i_row, i_split,
    stride_qb, stride_qh, stride_qt, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt, stride_table,
    HQ, HI, K, S, ROWS, LISTS_PER_KV, HEAD_TILES, max_pages, num_pages, slots_per_split, scale,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_PAGES: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_LO: tl.constexpr,
    PRECISION: tl.constexpr, LISTS: tl.constexpr, WINDOW: tl.constexpr,
):
    """One program's share of a list: row i_row (head tile, then (batch, list, token)) and split
    i_split -> its online-softmax state m [BLOCK_R], l [BLOCK_R], acc [BLOCK_R, BLOCK_DV] (float32),
    its rows of (B, HQ, K) [BLOCK_R] (64-bit) and the rows' mask [BLOCK_R]."""
    i_ht = i_row % HEAD_TILES  # head tiles fastest: the tiles of one list share its pages in L2
    i_bik = i_row // HEAD_TILES  # over (batch, list, token)
    i_k = i_bik % K
    i_hi = (i_bik // K) % HI
    i_b = (i_bik // (K * HI)).to(tl.int64)  # 64-bit: batch offsets pass 2**31 elements
    o_r = i_ht * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] rows: heads of the list
    m_r = o_r < ROWS
    o_hq = i_hi * ROWS + o_r
    o_d = tl.arange(0, BLOCK_D)
    p_q = q + i_b * stride_qb + o_hq[:, None] * stride_qh + i_k * stride_qt + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)  # [BLOCK_R, BLOCK_D]

    b_hi = tl.load(hi + i_b * K + i_k)
    b_lo = 0
    if LISTS == WINDOW_PAGES:
        b_lo = b_hi - WINDOW
    elif HAS_LO:
        b_lo = tl.load(lo + i_b * K + i_k)
    i_hkv = i_hi // LISTS_PER_KV
    p_k = k_pages + i_hkv * stride_kh
    p_v = v_pages + i_hkv * stride_vh
    p_list = i_bik.to(tl.int64) * (S - 1 if LISTS == LISTED_AND_OWN else S)
    p_table = i_b * stride_table

    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    start = i_split * slots_per_split  # a multiple of TILE_PAGES
    end = tl.minimum(start + slots_per_split, S)
    # one flat loop over the split's key tiles (so it pipelines): tile t holds slots
    # (t // CHUNKS) * TILE_PAGES ... + TILE_PAGES - 1, chunk t % CHUNKS of their pages
    for t in range(start // TILE_PAGES * CHUNKS, tl.cdiv(end, TILE_PAGES) * CHUNKS):
        b_phys, o_in, m_key = _tile_keys(blocks, valid, block_table, p_list, p_table, t // CHUNKS * TILE_PAGES,
                                         t % CHUNKS, end, max_pages, num_pages, b_lo, b_hi, S, PAGE, BLOCK_N, LISTS)
        b_m, b_l, b_acc = _attend_tile(b_q, b_m, b_l, b_acc, p_k, p_v, b_phys, o_in, m_key, stride_kp, stride_kt,
                                       stride_vp, stride_vt, scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION)
    o_rows = (i_b * HQ + o_hq) * K + i_k  # [BLOCK_R] rows of (B, HQ, K), 64-bit
    return b_m, b_l, b_acc, o_rows, m_r


@triton.jit
def store_partials(o_part, m_part, l_part, b_m, b_l, b_acc, o_rows, m_r, part, NUM_PARTS,
                    DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A program's state into partial `part` of its rows (rows of NUM_PARTS partials)."""
    o_dv = tl.arange(0, BLOCK_DV)
    p_part = o_rows * NUM_PARTS + part
    tl.store(o_part + p_part[:, None] * DV + o_dv[None, :], b_acc, mask=m_r[:, None] & (o_dv[None, :] < DV))
    tl.store(m_part + p_part, b_m, mask=m_r)
    tl.store(l_part + p_part, b_l, mask=m_r)


@triton.jit
def paged_decode_split_kernel(
    q, k_pages, v_pages, block_table, blocks, valid, hi, lo, o, o_part, m_part, l_part,
    stride_qb, stride_qh, stride_qt, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt, stride_table,
    HQ, HI, K, S, ROWS, LISTS_PER_KV, HEAD_TILES, max_pages, num_pages, slots_per_split, NUM_SPLITS, scale,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_PAGES: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_LO: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr, PRECISION: tl.constexpr, LISTS: tl.constexpr, WINDOW: tl.constexpr,
):
    """blocks, valid (B, HI, K, S) (LISTED_AND_OWN: S - 1 listed slots; WINDOW_PAGES: not read), hi,
    lo (B, K) contiguous; o (B, HQ, K, DV) contiguous; partials o_part (B, HQ, K, NS, DV), m_part,
    l_part (B, HQ, K, NS) float32 (used when WRITE_PARTIALS)."""
    i_split = tl.program_id(1)
    b_m, b_l, b_acc, o_rows, m_r = attend_list(
        q, k_pages, v_pages, block_table, blocks, valid, hi, lo, tl.program_id(0), i_split,
        stride_qb, stride_qh, stride_qt, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt, stride_table,
        HQ, HI, K, S, ROWS, LISTS_PER_KV, HEAD_TILES, max_pages, num_pages, slots_per_split, scale,
        PAGE, BLOCK_N, TILE_PAGES, CHUNKS, BLOCK_R, D, DV, BLOCK_D, BLOCK_DV, HAS_LO, PRECISION, LISTS, WINDOW)
    if WRITE_PARTIALS:
        store_partials(o_part, m_part, l_part, b_m, b_l, b_acc, o_rows, m_r, i_split, NUM_SPLITS, DV, BLOCK_DV)
    else:  # no visible key: acc and l are 0, the output 0
        o_dv = tl.arange(0, BLOCK_DV)
        b_out = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
        tl.store(o + o_rows[:, None] * DV + o_dv[None, :], b_out.to(o.dtype.element_ty),
                 mask=m_r[:, None] & (o_dv[None, :] < DV))


@triton.jit
def merge_partials(o_part, m_part, l_part, i_row, first, count, NUM_PARTS,
                   SPLITS_P: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Row i_row's partials first ... first + count - 1 (of its NUM_PARTS) merged: sum_s e^(m_s - M) acc_s /
    sum_s e^(m_s - M) l_s (M the largest m_s) -> [BLOCK_DV] float32; zeros when no partial saw a key."""
    o_s = tl.arange(0, SPLITS_P)
    o_dv = tl.arange(0, BLOCK_DV)
    m_s = o_s < count
    p_part = i_row * NUM_PARTS + first + o_s  # [SPLITS_P]
    b_m = tl.load(m_part + p_part, mask=m_s, other=float("-inf"))
    b_l = tl.load(l_part + p_part, mask=m_s, other=0.0)
    b_max = tl.max(b_m, axis=0)
    b_w = tl.exp(b_m - tl.where(b_max == float("-inf"), 0.0, b_max))  # [SPLITS_P]; 0 where m_s = -inf
    b_sum = tl.sum(b_w * b_l, axis=0)
    b_acc = tl.load(o_part + p_part[:, None] * DV + o_dv[None, :], mask=m_s[:, None] & (o_dv[None, :] < DV), other=0.0)
    return tl.sum(b_acc * b_w[:, None], axis=0) / tl.where(b_sum > 0, b_sum, 1.0)  # [BLOCK_DV]


@triton.jit
def paged_decode_merge_kernel(
    o_part, m_part, l_part, o, NUM_SPLITS,
    SPLITS_P: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One row (batch, query head, token): its NUM_SPLITS partials merged (merge_partials)."""
    i_row = tl.program_id(0).to(tl.int64)
    o_dv = tl.arange(0, BLOCK_DV)
    b_out = merge_partials(o_part, m_part, l_part, i_row, 0, NUM_SPLITS, NUM_SPLITS, SPLITS_P, DV, BLOCK_DV)
    tl.store(o + i_row * DV + o_dv, b_out.to(o.dtype.element_ty), mask=o_dv < DV)
