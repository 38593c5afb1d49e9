"""A decoding step's token writes into the cache's pages as one Triton launch: each new token's key
(rotated at its position first, when given the rotary frequencies) and value go to the slot
`position % PAGE` of the physical page `table[row, position // PAGE]`. The PyTorch twin is
nsa_core.reference.page_write (the rotation of ops.rotary_at_positions, then an index put).
A second launch (`page_mean_kernel`) refreshes the mean key of every page the step wrote to (the block
keys of importance "selected_keys"), one program per page, after the writes.

Dimension legend: B rows, HKV kv heads, K new tokens per row, D / Dv head dims, P rotated pairs
(2P <= D), NP physical pages, PAGE tokens per page.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def page_write_kernel(
    Kt, Vt, POS, FREQS, TABLE, KP, VP,
    NEW, HKV,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_pb, stride_pn, stride_tb,
    stride_kpp, stride_kph, stride_kps, stride_vpp, stride_vph, stride_vps,
    PAGE: tl.constexpr, PAIRS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ROTATE: tl.constexpr,
):
    """One program per (row, new token), looping over the kv heads: the page and slot are found
    once, the angles computed once (FREQS' dtype), every head's key and value row moved whole."""
    pid = tl.program_id(0)
    b = (pid // NEW).to(tl.int64)
    i = (pid % NEW).to(tl.int64)
    position = tl.load(POS + b * stride_pb + i * stride_pn).to(tl.int64)
    physical = tl.load(TABLE + b * stride_tb + position // PAGE).to(tl.int64)
    slot = position % PAGE
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    if ROTATE:
        pairs = tl.arange(0, BLOCK_D // 2)
        in_pairs = pairs < PAIRS
        freqs = tl.load(FREQS + pairs, mask=in_pairs, other=0.0)
        angles = position.to(freqs.dtype) * freqs
        cos = tl.where(in_pairs, tl.cos(angles), 1.0)
        sin = tl.where(in_pairs, tl.sin(angles), 0.0)
    for h in range(HKV):
        h = tl.cast(h, tl.int64)
        k = tl.load(Kt + b * stride_kb + h * stride_kh + i * stride_kn + dims, mask=dims < D, other=0.0)
        if ROTATE:
            x0, x1 = tl.split(tl.reshape(k.to(cos.dtype), (BLOCK_D // 2, 2)))
            k = tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), (BLOCK_D,))
        tl.store(KP + physical * stride_kpp + h * stride_kph + slot * stride_kps + dims, k.to(KP.dtype.element_ty),
                 mask=dims < D)
        v = tl.load(Vt + b * stride_vb + h * stride_vh + i * stride_vn + dims_v, mask=dims_v < DV, other=0.0)
        tl.store(VP + physical * stride_vpp + h * stride_vph + slot * stride_vps + dims_v, v.to(VP.dtype.element_ty),
                 mask=dims_v < DV)


@triton.jit
def page_mean_kernel(
    KP, POS, TABLE, MEANS, NEW, HKV,
    stride_pb, stride_pn, stride_tb, stride_kpp, stride_kph, stride_kps, stride_mp, stride_mh,
    PAGE: tl.constexpr, D: tl.constexpr, BLOCK_PAGE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (row, new token); the row's last new token in each page (its last token of the
    step, or one at the page's last slot) writes that page's mean key of every kv head, in float32
    then the means' dtype. A row's new positions are consecutive, so each page written gets one."""
    pid = tl.program_id(0)
    b = (pid // NEW).to(tl.int64)
    i = (pid % NEW).to(tl.int64)
    position = tl.load(POS + b * stride_pb + i * stride_pn).to(tl.int64)
    if (i == NEW - 1) | (position % PAGE == PAGE - 1):
        physical = tl.load(TABLE + b * stride_tb + position // PAGE).to(tl.int64)
        slots = tl.arange(0, BLOCK_PAGE)
        dims = tl.arange(0, BLOCK_D)
        mask = (slots < PAGE)[:, None] & (dims < D)[None, :]
        for h in range(HKV):
            h = tl.cast(h, tl.int64)
            keys = tl.load(KP + physical * stride_kpp + h * stride_kph + slots[:, None] * stride_kps + dims[None, :],
                           mask=mask, other=0.0).to(tl.float32)
            tl.store(MEANS + physical * stride_mp + h * stride_mh + dims, (tl.sum(keys, axis=0) / PAGE).to(
                MEANS.dtype.element_ty), mask=dims < D)


@torch.library.custom_op("nsa::refresh_page_means", mutates_args=("means",))
def refresh_page_means_triton(means: torch.Tensor, k_pages: torch.Tensor, table: torch.Tensor,
                              positions: torch.Tensor) -> None:
    """means (NP, HKV, D) of k_pages (NP, HKV, PAGE, D) (unit stride on D), for the pages the tokens at
    positions (B, K) (consecutive per row) were written to through table (B, pages per row)."""
    B, K = positions.shape
    if B * K == 0:
        return
    D = k_pages.shape[-1]
    page_mean_kernel[(B * K,)](
        k_pages, positions, table, means, K, k_pages.shape[1],
        positions.stride(0), positions.stride(1), table.stride(0), k_pages.stride(0), k_pages.stride(1),
        k_pages.stride(2), means.stride(0), means.stride(1),
        PAGE=k_pages.shape[2], D=D, BLOCK_PAGE=triton.next_power_of_2(k_pages.shape[2]),
        BLOCK_D=max(2, triton.next_power_of_2(D)),
    )


@refresh_page_means_triton.register_fake
def _refresh_page_means_fake(means, k_pages, table, positions) -> None:
    return None


@torch.library.custom_op("nsa::write_pages", mutates_args=("k_pages", "v_pages"))
def write_pages_triton(k_pages: torch.Tensor, v_pages: torch.Tensor, table: torch.Tensor, positions: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor | None) -> None:
    """k (B, HKV, K, D), v (B, HKV, K, Dv) into k_pages (NP, HKV, PAGE, D) / v_pages (NP, HKV, PAGE, Dv)
    (unit stride on the last dims) at positions (B, K); freqs (P,) in the compute dtype, or None.
    A custom op that mutates the pages, so torch.compile traces through it (fullgraph decode steps)."""
    B, HKV, K, D = k.shape
    Dv = v.shape[-1]
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    rotate = freqs is not None
    freqs = freqs.contiguous() if rotate else k  # an unread pointer when not rotating
    if B * K == 0:
        return
    page_write_kernel[(B * K,)](
        k, v, positions, freqs, table, k_pages, v_pages, K, HKV,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        positions.stride(0), positions.stride(1), table.stride(0),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        PAGE=k_pages.shape[2], PAIRS=freqs.shape[0] if rotate else 0, D=D, DV=Dv,
        BLOCK_D=max(2, triton.next_power_of_2(D)), BLOCK_DV=max(2, triton.next_power_of_2(Dv)), ROTATE=rotate,
    )


@write_pages_triton.register_fake
def _write_pages_fake(k_pages, v_pages, table, positions, k, v, freqs) -> None:
    return None
