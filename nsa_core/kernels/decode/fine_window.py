"""A decoding step's selected and window branches and the gated combine of all three in two launches.

`fine_window_split_kernel`: one 1-D grid holding the programs of both branches' paged split-K
attention (kernel.py's `attend_list`): first the selected branch's (rule LISTED_AND_OWN: the listed
blocks and the query's own page), then the window's (rule WINDOW_PAGES), each writing its float32
partials (m, l, acc) into one buffer of SPLITS_SEL + SPLITS_WIN partials per row.
`fine_window_combine_kernel`: per row (batch, query head, token), the two branches' partials merged
apart, then out = g0 * compressed + g1 * selected + g2 * window written token-major (B, K, HQ, DV)
for the output projection, as ops/combine.py's combine does; where the gates are sigmoid(linear(x)) of the
normed input, that launch computes them too (each program the three dot products of its head). So the step
spends two launches where the branches, the combine and the gates took seven (two split-K launches, their two
merges, the combine, the gates' matmul and sigmoid).
The PyTorch twin is the composition the op falls back to: decode_attention for each branch, then
combine (ops/selected_window_combine.py).

Dimension legend: B batch, HQ query heads, HKV kv heads, HI lists of the selected branch (HKV or HQ),
K query tokens, S slots per list, P physical pages, PAGE keys per page, D / DV head dims, NS splits.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nsa_core.kernels import outputs
from nsa_core.kernels.decode.kernel import (LISTED_AND_OWN, WINDOW_PAGES, attend_list, merge_partials,
                                            store_partials)
from nsa_core.kernels.decode.launch import (_pow2, _unit_last_stride, head_tiles, merge_warps, sm_count, split_plan,
                                            split_warps, tiles, window_slots)


# of the normed input, per loop step of the gates' linear layer in the combine launch (at most the input's width);
# with 4 warps where that layer runs in it: 2048 took the split + combine 48.2 -> 43.9 us at 64k x 16 and 24.1 ->
# 21.0 at 64k x 1 on an H100 (benchmarks/decode/step_warps.py, RESULTS.md)
GATE_INPUTS_PER_STEP = 2048


@triton.jit
def fine_window_split_kernel(
    q, sel_k, sel_v, win_k, win_v, block_table, blocks, valid, hi, o_part, m_part, l_part,
    stride_qb, stride_qh, stride_qt,
    stride_skp, stride_skh, stride_skt, stride_svp, stride_svh, stride_svt,
    stride_wkp, stride_wkh, stride_wkt, stride_wvp, stride_wvh, stride_wvt, stride_table,
    HQ, HI, HKV, K, S_SEL, S_WIN, max_pages, num_pages_sel, num_pages_win, slots_sel, slots_win,
    PROGRAMS_SEL, SPLITS_SEL, PROGRAMS_WIN, NUM_PARTS, HEAD_TILES_SEL, HEAD_TILES_WIN, scale,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, TILE_PAGES: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_R_SEL: tl.constexpr, BLOCK_R_WIN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, WINDOW: tl.constexpr,
):
    """blocks, valid (B, HI, K, S_SEL - 1) contiguous (valid as uint8), hi (B, K) contiguous; partials
    o_part (B, HQ, K, NUM_PARTS, DV), m_part, l_part (B, HQ, K, NUM_PARTS) float32: partials
    0 ... SPLITS_SEL - 1 the selected branch's, the rest the window's."""
    i = tl.program_id(0)
    if i < PROGRAMS_SEL * SPLITS_SEL:
        i_split = i // PROGRAMS_SEL
        b_m, b_l, b_acc, o_rows, m_r = attend_list(
            q, sel_k, sel_v, block_table, blocks, valid, hi, hi, i % PROGRAMS_SEL, i_split,
            stride_qb, stride_qh, stride_qt, stride_skp, stride_skh, stride_skt, stride_svp, stride_svh, stride_svt,
            stride_table, HQ, HI, K, S_SEL, HQ // HI, HI // HKV, HEAD_TILES_SEL, max_pages, num_pages_sel, slots_sel,
            scale, PAGE, BLOCK_N, TILE_PAGES, CHUNKS, BLOCK_R_SEL, D, DV, BLOCK_D, BLOCK_DV, False, PRECISION,
            LISTED_AND_OWN, 0)
        store_partials(o_part, m_part, l_part, b_m, b_l, b_acc, o_rows, m_r, i_split, NUM_PARTS, DV, BLOCK_DV)
    else:
        j = i - PROGRAMS_SEL * SPLITS_SEL
        i_split = j // PROGRAMS_WIN
        b_m, b_l, b_acc, o_rows, m_r = attend_list(
            q, win_k, win_v, block_table, blocks, valid, hi, hi, j % PROGRAMS_WIN, i_split,
            stride_qb, stride_qh, stride_qt, stride_wkp, stride_wkh, stride_wkt, stride_wvp, stride_wvh, stride_wvt,
            stride_table, HQ, HKV, K, S_WIN, HQ // HKV, 1, HEAD_TILES_WIN, max_pages, num_pages_win, slots_win,
            scale, PAGE, BLOCK_N, TILE_PAGES, CHUNKS, BLOCK_R_WIN, D, DV, BLOCK_D, BLOCK_DV, False, PRECISION,
            WINDOW_PAGES, WINDOW)
        store_partials(o_part, m_part, l_part, b_m, b_l, b_acc, o_rows, m_r, SPLITS_SEL + i_split, NUM_PARTS, DV,
                       BLOCK_DV)


@triton.jit
def _linear_gates(gate_x, gate_w, gate_b, i_b, i_k, i_h, DIM, stride_xb, stride_xk, stride_w,
                  HAS_BIAS: tl.constexpr, BLOCK_X: tl.constexpr):
    """Head i_h's three gates of token (i_b, i_k): sigmoid(x @ W[3h : 3h + 3].T + b), each rounded to the
    input's dtype after the linear layer and after the sigmoid, as nn.Linear and torch.sigmoid round."""
    o_s = tl.arange(0, 4)  # the three branches, padded
    m_s = o_s < 3
    p_x = gate_x + i_b * stride_xb + i_k * stride_xk
    p_w = gate_w + (i_h * 3 + o_s)[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([4], dtype=tl.float32)
    for x0 in range(0, DIM, BLOCK_X):
        o_x = x0 + tl.arange(0, BLOCK_X)
        m_x = o_x < DIM
        b_x = tl.load(p_x + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_w = tl.load(p_w + o_x[None, :], mask=m_s[:, None] & m_x[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(b_w * b_x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(gate_b + i_h * 3 + o_s, mask=m_s, other=0.0).to(tl.float32)
    dtype = gate_x.dtype.element_ty
    logits = acc.to(dtype).to(tl.float32)
    gates = tl.sigmoid(logits).to(dtype).to(tl.float32)
    g0 = tl.sum(tl.where(o_s == 0, gates, 0.0), axis=0)
    g1 = tl.sum(tl.where(o_s == 1, gates, 0.0), axis=0)
    g2 = tl.sum(tl.where(o_s == 2, gates, 0.0), axis=0)
    return g0, g1, g2


@triton.jit
def fine_window_combine_kernel(
    o_part, m_part, l_part, compressed, gates, gate_x, gate_w, gate_b, out, HQ, K, SPLITS_SEL, NUM_PARTS, DIM,
    stride_cb, stride_ch, stride_ck, stride_gb, stride_gh, stride_gk, stride_gs, stride_ob, stride_ok, stride_oh,
    stride_xb, stride_xk, stride_w,
    SPLITS_P: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, LINEAR_GATES: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """One row (batch, query head, token) of (B, HQ, K): compressed (B, HQ, K, DV), gates (B, HQ, K, 3)
    -> out[b, k, h] (B, K, HQ, DV). LINEAR_GATES: the gates from the normed input gate_x (B, K, DIM),
    gate_w (3 HQ, DIM) and gate_b (3 HQ,) instead (`gates` unread)."""
    i_row = tl.program_id(0).to(tl.int64)
    i_k = i_row % K
    i_h = (i_row // K) % HQ
    i_b = i_row // (K * HQ)
    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < DV
    b_sel = merge_partials(o_part, m_part, l_part, i_row, 0, SPLITS_SEL, NUM_PARTS, SPLITS_P, DV, BLOCK_DV)
    b_win = merge_partials(o_part, m_part, l_part, i_row, SPLITS_SEL, NUM_PARTS - SPLITS_SEL, NUM_PARTS, SPLITS_P, DV,
                           BLOCK_DV)
    if LINEAR_GATES:
        g0, g1, g2 = _linear_gates(gate_x, gate_w, gate_b, i_b, i_k, i_h, DIM, stride_xb, stride_xk, stride_w,
                                   HAS_BIAS, BLOCK_X)
    else:
        p_g = gates + i_b * stride_gb + i_h * stride_gh + i_k * stride_gk
        g0 = tl.load(p_g).to(tl.float32)
        g1 = tl.load(p_g + stride_gs).to(tl.float32)
        g2 = tl.load(p_g + 2 * stride_gs).to(tl.float32)
    b_c = tl.load(compressed + i_b * stride_cb + i_h * stride_ch + i_k * stride_ck + o_dv, mask=m_dv,
                  other=0.0).to(tl.float32)
    b_out = g0 * b_c + g1 * b_sel + g2 * b_win
    tl.store(out + i_b * stride_ob + i_k * stride_ok + i_h * stride_oh + o_dv, b_out.to(out.dtype.element_ty),
             mask=m_dv)


def combine_warps(block_dv: int, splits_p: int, linear_gates: bool) -> int:
    """Warps of fine_window_combine_kernel: 4 where the gates' linear layer runs in it (its [4, 2048] weight
    tile), else the paged merges' rule (launch.merge_warps); benchmarks/decode/step_warps.py sweeps both."""
    return 4 if linear_gates else merge_warps(block_dv, splits_p)


def _fine_window_launch(q, sel_k, sel_v, win_k, win_v, block_table, blocks, valid, hi, compressed, gates,
                        gate_x=None, gate_w=None, gate_b=None, *, scale: float, window: int) -> torch.Tensor:
    """q (B, HQ, K, D) rotated; sel_k / sel_v and win_k / win_v pools (P, HKV, PAGE, D / DV) (one page size,
    one block table (B, max_pages)); blocks / valid (B, HI, K, S) the selected pages (each query's own
    page is added); hi (B, K) the queries' positions; compressed (B, HQ, K, DV) the compressed branch's
    output; gates (B, HQ, K, 3), or None with gate_x (B, K, DIM), gate_w (3 HQ, DIM) and gate_b (3 HQ,)
    or None, the gates being sigmoid(gate_x @ gate_w.T + gate_b) -> (B, K, HQ, DV) in q's dtype (inputs
    validated by the caller). No host synchronisation: every choice comes from shapes and the SM count."""
    B, HQ, K, D = q.shape
    HKV, PAGE = sel_k.shape[1], sel_k.shape[2]
    DV = sel_v.shape[-1]
    HI = blocks.shape[1]
    S_SEL, S_WIN = blocks.shape[-1] + 1, window_slots(window, PAGE)
    cfg_sel = tiles(HQ, HI, PAGE, D, DV, q.dtype)
    cfg_win = tiles(HQ, HKV, PAGE, D, DV, q.dtype)
    q, sel_k, sel_v, win_k, win_v, block_table, compressed = (_unit_last_stride(t) for t in
                                                              (q, sel_k, sel_v, win_k, win_v, block_table, compressed))
    hi = hi.contiguous()
    blocks, valid = blocks.contiguous(), valid.contiguous().view(torch.uint8)
    head_tiles_sel, head_tiles_win = head_tiles(HQ, HI, cfg_sel), head_tiles(HQ, HKV, cfg_win)
    programs_sel, programs_win = B * HI * K * head_tiles_sel, B * HKV * K * head_tiles_win
    out = outputs.new_output(B, K, HQ, DV, device=q.device, dtype=q.dtype)
    if B * K == 0:
        return out
    # each branch split as if its programs shared the GPU with the other's (one launch holds both)
    sms, together = sm_count(q.device), programs_sel + programs_win
    splits_sel, slots_sel = split_plan(together, S_SEL, cfg_sel, sms)
    splits_win, slots_win = split_plan(together, S_WIN, cfg_win, sms)
    parts = splits_sel + splits_win
    o_part = outputs.new_output(B, HQ, K, parts, DV, device=q.device, dtype=torch.float32)
    m_part = outputs.new_output(B, HQ, K, parts, device=q.device, dtype=torch.float32)
    l_part = outputs.new_output(B, HQ, K, parts, device=q.device, dtype=torch.float32)
    shared = {k: cfg_sel[k] for k in ("PAGE", "BLOCK_N", "TILE_PAGES", "CHUNKS", "D", "DV", "BLOCK_D", "BLOCK_DV",
                                      "PRECISION")}
    fine_window_split_kernel[(programs_sel * splits_sel + programs_win * splits_win,)](
        q, sel_k, sel_v, win_k, win_v, block_table, blocks, valid, hi, o_part, m_part, l_part,
        *q.stride()[:3], *sel_k.stride()[:3], *sel_v.stride()[:3], *win_k.stride()[:3], *win_v.stride()[:3],
        block_table.stride(0), HQ, HI, HKV, K, S_SEL, S_WIN, block_table.shape[1], sel_k.shape[0], win_k.shape[0],
        slots_sel, slots_win, programs_sel, splits_sel, programs_win, parts, head_tiles_sel, head_tiles_win, scale,
        BLOCK_R_SEL=cfg_sel["BLOCK_R"], BLOCK_R_WIN=cfg_win["BLOCK_R"], WINDOW=int(window),
        num_warps=split_warps(cfg_sel, cfg_win), **shared,
    )
    splits_p = _pow2(max(splits_sel, splits_win))
    linear = gates is None
    if linear:
        gate_x, gate_w = _unit_last_stride(gate_x), _unit_last_stride(gate_w)
        gates, dim, x_strides, w_stride = gate_w, gate_x.shape[-1], gate_x.stride()[:2], gate_w.stride(0)
    else:
        gate_x = gate_w = gates
        dim, x_strides, w_stride = 0, (0, 0), 0
    has_bias = linear and gate_b is not None
    fine_window_combine_kernel[(B * HQ * K,)](
        o_part, m_part, l_part, compressed, gates, gate_x, gate_w, gate_b.contiguous() if has_bias else gate_w, out,
        HQ, K, splits_sel, parts, dim, *compressed.stride()[:3], *(gates.stride() if not linear else (0,) * 4),
        out.stride(0), out.stride(1), out.stride(2), *x_strides, w_stride,
        SPLITS_P=splits_p, DV=DV, BLOCK_DV=cfg_sel["BLOCK_DV"], LINEAR_GATES=linear, HAS_BIAS=has_bias,
        BLOCK_X=min(GATE_INPUTS_PER_STEP, _pow2(max(dim, 1), 16)),
        num_warps=combine_warps(cfg_sel["BLOCK_DV"], splits_p, linear),
    )
    return out


@torch.library.custom_op("nsa::fine_window_step", mutates_args=())
def _fine_window_op(q: torch.Tensor, sel_k: torch.Tensor, sel_v: torch.Tensor, win_k: torch.Tensor,
                    win_v: torch.Tensor, block_table: torch.Tensor, blocks: torch.Tensor, valid: torch.Tensor,
                    hi: torch.Tensor, compressed: torch.Tensor, gates: Optional[torch.Tensor],
                    gate_x: Optional[torch.Tensor], gate_w: Optional[torch.Tensor], gate_b: Optional[torch.Tensor],
                    scale: float, window: int) -> torch.Tensor:
    return _fine_window_launch(q, sel_k, sel_v, win_k, win_v, block_table, blocks, valid, hi, compressed, gates,
                               gate_x, gate_w, gate_b, scale=scale, window=window)


@_fine_window_op.register_fake
def _fine_window_fake(q, sel_k, sel_v, win_k, win_v, block_table, blocks, valid, hi, compressed, gates, gate_x, gate_w,
                      gate_b, scale, window):
    B, HQ, K, _ = q.shape
    return q.new_empty(B, K, HQ, sel_v.shape[-1])


def fine_window_fwd(q, sel_k, sel_v, win_k, win_v, block_table, blocks, valid, hi, compressed, gates, gate_x=None,
                    gate_w=None, gate_b=None, *, scale: float, window: int) -> torch.Tensor:
    """The fused launches as a torch.library op with a fake (meta) implementation, so
    torch.compile(fullgraph=True) traces a decoding step through it (arguments as _fine_window_launch's)."""
    return _fine_window_op(q, sel_k, sel_v, win_k, win_v, block_table, blocks, valid, hi, compressed, gates, gate_x,
                           gate_w, gate_b, float(scale), int(window))
