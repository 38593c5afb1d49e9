"""A decoding step's compression of the windows its tokens complete, for the default compression
network (Linear -> ReLU -> Linear over the flattened window), in two launches for keys and values
together, and the compression ring moved on:

1. `window_mlp_kernel`, grid (hidden tiles, 2 networks, row tiles): a row is one (sequence, new
   token, kv head); a program whose rows complete no window returns at once (most steps: one in
   `stride` tokens completes one), the others run the first layer over their window (the ring's
   tokens and the step's, plus the intra-block positions), the ReLU, and the second layer's share
   of their hidden tile into a float32 partial;
2. `window_finish_kernel`, grid (sequences x kv heads, 2 networks): sums the partials of every
   completed window, adds the second layer's bias, stores the compressed token into its slot
   of the compressed pages, then shifts the ring by the step's tokens.
The weights are read only on steps where some row completes a window; the windows of tokens that
complete none are not computed (the op's PyTorch path, its twin, compresses every new token's window
and writes the incomplete ones to the scratch slot). Deterministic: no atomics.

Under Triton's interpreter (CPU tensors) 16-bit tiles are converted to float32 before any arithmetic
and the dots run in float32 (UPCAST): its tl.dot multiplies bfloat16 bit patterns
(triton-lang/triton#11584), as its elementwise ops do, and its casts to bfloat16 truncate; so there
the window and the hidden layer are not rounded to the tokens' dtype, as they are on a GPU.

Dimension legend: B sequences, K new tokens per sequence, HKV kv heads, R tokens per window (ring
length), D head dim, N hidden units of the first layer, NT hidden tiles, CPAGE compressed slots per page.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS_PER_PROGRAM = 64


@dataclass(frozen=True)
class MLPTiles:
    """window_mlp_kernel's tiling: `block_n` hidden units per program; `k_width` the first layer's
    inputs (window tokens x head dim) one dot reads, i.e. max(1, k_width // BLOCK_D) window tokens per
    loop step; num_warps / num_stages as Triton's. The default is the fastest of
    benchmarks/decode/compression_tiles.py's sweep on a batch where one row of 16 completes a window
    (H100, paper layer: 93 us against 101 with 3 stages; benchmarks/NOTES.md)."""

    block_n: int = 32
    k_width: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def tokens_per_step(self, block_d: int) -> int:
        return max(1, self.k_width // block_d)


TILES = MLPTiles()


@triton.jit
def _ring_then_new(ring, new, ring_row, new_row, s, mask, dims, stride_rn, stride_nn, R: tl.constexpr):
    """Tokens s of ring ++ new (ring: R tokens, then the step's), for rows at offsets ring_row / new_row
    (broadcast against s[:, None]); zeros where mask is off."""
    from_ring = (s < R)[:, None]
    x_ring = tl.load(ring + ring_row + s[:, None] * stride_rn + dims[None, :], mask=mask & from_ring, other=0.0)
    x_new = tl.load(new + new_row + (s - R)[:, None] * stride_nn + dims[None, :], mask=mask & ~from_ring, other=0.0)
    return tl.where(from_ring, x_ring, x_new)


@triton.jit
def window_mlp_kernel(
    RING_K, RING_V, NEW_K, NEW_V, POS, SLOT_OF, POS_K, POS_V, W1_K, W1_V, B1_K, B1_V, W2_K, W2_V, PART,
    ROWS, K, HKV, SCRATCH, N,
    stride_rb, stride_rh, stride_rn, stride_nb, stride_nh, stride_nn, stride_pb,  # POS: unit stride on K
    stride_eh, stride_en, stride_w1, stride_w2, stride_part_t, stride_part_net, stride_part_row,
    R: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    JB: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    net = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # (b * K + t) * HKV + h
    in_rows = rows < ROWS
    h = (rows % HKV).to(tl.int64)
    t = ((rows // HKV) % K).to(tl.int64)
    b = (rows // (HKV * K)).to(tl.int64)
    position = tl.load(POS + b * stride_pb + t, mask=in_rows, other=0)
    completes = in_rows & (tl.load(SLOT_OF + position, mask=in_rows, other=SCRATCH) != SCRATCH)
    if tl.max(completes.to(tl.int32), axis=0) == 0:
        return
    if net == 0:
        ring, new, intra, w1, b1, w2 = RING_K, NEW_K, POS_K, W1_K, B1_K, W2_K
    else:
        ring, new, intra, w1, b1, w2 = RING_V, NEW_V, POS_V, W1_V, B1_V, W2_V
    dims = tl.arange(0, BLOCK_D)
    in_dims = dims < D
    units = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    in_units = units < N
    ring_row, new_row = (b * stride_rb + h * stride_rh)[:, None], (b * stride_nb + h * stride_nh)[:, None]
    # a loop step's columns: JB window tokens of BLOCK_D dims each (token j0 + jj, dim dd)
    cols = tl.arange(0, JB * BLOCK_D)
    jj, dd = cols // BLOCK_D, cols % BLOCK_D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, R, JB):
        j = j0 + jj  # [JB * BLOCK_D] window tokens
        in_cols = (dd < D) & (j < R)
        live = completes[:, None] & in_cols[None, :]
        # window token j of the window ending at new token t: index t + 1 + j of ring ++ new
        s = t[:, None] + 1 + j[None, :]
        from_ring = s < R
        x_ring = tl.load(ring + ring_row + s * stride_rn + dd[None, :], mask=live & from_ring, other=0.0)
        x_new = tl.load(new + new_row + (s - R) * stride_nn + dd[None, :], mask=live & ~from_ring, other=0.0)
        x = tl.where(from_ring, x_ring, x_new)
        x_pos = tl.load(intra + h[:, None] * stride_eh + j[None, :] * stride_en + dd[None, :], mask=live, other=0.0)
        x = x.to(tl.float32) + x_pos.to(tl.float32)
        w = tl.load(w1 + units[:, None] * stride_w1 + (j * D + dd)[None, :], mask=in_units[:, None] & in_cols[None, :],
                    other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        else:
            x = x.to(w1.dtype.element_ty)  # the window plus its positions in the tokens' dtype, as the module adds them
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    hidden = acc + tl.load(b1 + units, mask=in_units, other=0.0).to(tl.float32)
    hidden = tl.maximum(hidden, 0.0)
    w_out = tl.load(w2 + dims[:, None] * stride_w2 + units[None, :], mask=in_dims[:, None] & in_units[None, :], other=0.0)
    if UPCAST:
        w_out = w_out.to(tl.float32)
    else:
        hidden = hidden.to(w2.dtype.element_ty)  # the first layer's output in its dtype, as nn.Linear's
    part = tl.dot(hidden, tl.trans(w_out), input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)
    tl.store(PART + tile * stride_part_t + net * stride_part_net + rows[:, None].to(tl.int64) * stride_part_row
             + dims[None, :], part, mask=completes[:, None] & in_dims[None, :])


@triton.jit
def window_finish_kernel(
    RING_K, RING_V, NEW_K, NEW_V, POS, SLOT_OF, B2_K, B2_V, PART, CK, CV, CTABLE,
    K, HKV, SCRATCH, NT,
    stride_rb, stride_rh, stride_rn, stride_nb, stride_nh, stride_nn, stride_pb,
    stride_part_t, stride_part_net, stride_part_row, stride_cp, stride_ch, stride_cs, stride_tb,
    R: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CPAGE: tl.constexpr,
):
    pid = tl.program_id(0)
    net = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    h = (pid % HKV).to(tl.int64)
    if net == 0:
        ring, new, b2, pages = RING_K, NEW_K, B2_K, CK
    else:
        ring, new, b2, pages = RING_V, NEW_V, B2_V, CV
    dims = tl.arange(0, BLOCK_D)
    in_dims = dims < D
    bias = tl.load(b2 + dims, mask=in_dims, other=0.0).to(tl.float32)
    for t in range(K):
        slot = tl.load(SLOT_OF + tl.load(POS + b * stride_pb + t)).to(tl.int64)
        if slot != SCRATCH:
            row = (b * K + t) * HKV + h
            total = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for tile in range(NT):
                total += tl.load(PART + tile * stride_part_t + net * stride_part_net + row * stride_part_row + dims,
                                 mask=in_dims, other=0.0)
            physical = tl.load(CTABLE + b * stride_tb + slot // CPAGE).to(tl.int64)
            tl.store(pages + physical * stride_cp + h * stride_ch + (slot % CPAGE) * stride_cs + dims,
                     (total + bias).to(pages.dtype.element_ty), mask=in_dims)
    # the ring keeps the last R tokens of ring ++ new: index K + i of it for ring slot i
    i = tl.arange(0, BLOCK_R)
    live = (i < R)[:, None] & in_dims[None, :]
    kept = _ring_then_new(ring, new, b * stride_rb + h * stride_rh, b * stride_nb + h * stride_nh, K + i, live, dims,
                          stride_rn, stride_nn, R)
    tl.debug_barrier()  # every program reads its own (b, h) ring only: loads before stores
    tl.store(ring + b * stride_rb + h * stride_rh + i[:, None] * stride_rn + dims[None, :], kept, mask=live)


def _rows_per_program(rows: int) -> int:
    return min(MAX_ROWS_PER_PROGRAM, max(16, triton.next_power_of_2(rows)))


def _compress_launch(ring_k, ring_v, k, v, positions, slot_of, scratch, ck_pages, cv_pages, table, k_positions,
                     v_positions, w1_k, b1_k, w2_k, b2_k, w1_v, b1_v, w2_v, b2_v) -> None:
    """ring_k / ring_v (B, HKV, R, D), the step's k / v (B, HKV, K, D) at positions (B, K); slot_of
    (capacity,): the compressed slot a token at that position completes, or `scratch`; the pages
    (NCP, HKV, CPAGE, D) behind table (B, pages per row); the intra-block positions (HKV, R, D);
    per network W1 (N, R * D), b1 (N,), W2 (D, N), b2 (D,). Every tensor with unit stride on its
    last dim, keys and values of one layout (rings, tokens, intra-block positions, layers, pages: the op
    checks); the rings and the step's tokens may be strided views."""
    B, HKV, K, D = k.shape
    R = ring_k.shape[2]
    N = w1_k.shape[0]
    rows = B * K * HKV
    if rows == 0:
        return
    block_m = _rows_per_program(rows)
    tiles = TILES
    nt = triton.cdiv(N, tiles.block_n)
    part = torch.empty(nt, 2, rows, D, device=k.device, dtype=torch.float32)
    upcast = k.dtype != torch.float32 and k.device.type == "cpu"  # the interpreter's tl.dot: see UPCAST above
    precision = "ieee" if k.dtype == torch.float32 or upcast else "tf32"
    block_d = max(16, triton.next_power_of_2(D))
    strides = (*ring_k.stride()[:3], *k.stride()[:3], positions.stride(0))
    window_mlp_kernel[(nt, 2, triton.cdiv(rows, block_m))](
        ring_k, ring_v, k, v, positions, slot_of, k_positions, v_positions, w1_k, w1_v, b1_k, b1_v, w2_k, w2_v, part,
        rows, K, HKV, scratch, N, *strides,
        k_positions.stride(0), k_positions.stride(1), w1_k.stride(0), w2_k.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        R=R, D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=tiles.block_n, JB=tiles.tokens_per_step(block_d),
        PRECISION=precision, UPCAST=upcast, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    window_finish_kernel[(B * HKV, 2)](
        ring_k, ring_v, k, v, positions, slot_of, b2_k, b2_v, part, ck_pages, cv_pages, table,
        K, HKV, scratch, nt, *strides,
        part.stride(0), part.stride(1), part.stride(2), ck_pages.stride(0), ck_pages.stride(1), ck_pages.stride(2),
        table.stride(0),
        R=R, BLOCK_R=triton.next_power_of_2(R), D=D, BLOCK_D=block_d, CPAGE=ck_pages.shape[2],
    )


@torch.library.custom_op("nsa::compress_step_windows", mutates_args=("ring_k", "ring_v", "ck_pages", "cv_pages"))
def compress_step_windows_triton(ring_k: torch.Tensor, ring_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 positions: torch.Tensor, slot_of: torch.Tensor, scratch: int,
                                 ck_pages: torch.Tensor, cv_pages: torch.Tensor, table: torch.Tensor,
                                 k_positions: torch.Tensor, v_positions: torch.Tensor,
                                 w1_k: torch.Tensor, b1_k: torch.Tensor, w2_k: torch.Tensor, b2_k: torch.Tensor,
                                 w1_v: torch.Tensor, b1_v: torch.Tensor, w2_v: torch.Tensor, b2_v: torch.Tensor) -> None:
    """The launches as a torch.library op (arguments as _compress_launch's) with a fake, for torch.compile."""
    _compress_launch(ring_k, ring_v, k, v, positions, slot_of, scratch, ck_pages, cv_pages, table, k_positions,
                     v_positions, w1_k, b1_k, w2_k, b2_k, w1_v, b1_v, w2_v, b2_v)


@compress_step_windows_triton.register_fake
def _compress_step_windows_fake(ring_k, ring_v, k, v, positions, slot_of, scratch, ck_pages, cv_pages, table,
                                k_positions, v_positions, w1_k, b1_k, w2_k, b2_k, w1_v, b1_v, w2_v, b2_v) -> None:
    return None
