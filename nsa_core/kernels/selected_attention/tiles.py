"""Tiles, warps and stages of the selected-attention kernels: pure functions of the shapes and the
dtype (Python ints, no tensors), called by launch.py and by the ahead-of-time checks of shared
memory (benchmarks/smem_sweep.py, tests/kernels/test_smem.py).

Dimension legend: D / DV head dims, G query heads per kv head, rows query heads per program row
set (G when heads share the selection, else 1), S slots.
"""

from __future__ import annotations

import torch
import triton


def pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


def key_tiles(D: int, DV: int, block_size: int, dtype: torch.dtype) -> dict:
    """The constexprs every kernel shares: the block (BLOCK, padded to BLOCK_N keys), the head dims
    (padded to BLOCK_D / BLOCK_DV) and the dots' precision."""
    return dict(BLOCK=block_size, BLOCK_N=pow2(block_size, 16), D=D, DV=DV, BLOCK_D=pow2(D, 16), BLOCK_DV=pow2(DV, 16),
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def rows(HQ: int, HKV: int, HI: int) -> tuple[int, int]:
    """Query heads per program row set: the group when heads share the selection, else one; and
    that count padded for the by-query kernels (16 rows: a full tensor-core tile)."""
    r = HQ // HKV if HI == HKV else 1
    return r, pow2(r, 16)


def slots_per_step(S: int, block_n: int) -> int:
    """Selected blocks gathered into one key tile of the by-query kernels: tiles of about 128 keys."""
    return max(1, min(pow2(S), 128 // block_n))


def by_query(tiles: dict) -> dict:
    """Warps and stages of the by-query forward and dQ kernels."""
    return dict(num_warps=4 if tiles["BLOCK_D"] <= 128 else 8, num_stages=2)


def fwd_by_block(tiles: dict, G: int) -> dict:
    """Entry rows per step, warps and stages of the by-block forward: 128 rows, 4 warps, 2 stages,
    measured on an H100 at 64k (benchmarks/NOTES.md): G=1 2.07 ms vs 2.80 with 64 rows, G=4 7.48
    vs 9.21; 8 warps or 3 stages were slower."""
    return dict(BLOCK_M=max(128, pow2(G)), num_warps=4, num_stages=2)


def dkdv(tiles: dict, G: int, rows: int, by_block: bool) -> dict:
    """Query rows per step, warps and stages of the dK/dV kernel. Measured on an H100 at 64k
    (benchmarks/NOTES.md): by query 64 rows x 4 warps (8 above 128 dims); by block 128 rows x 8
    warps (G=4: 11.8 ms vs 15.9 with 4 warps, 19.3 with 64 rows), 32 rows x 8 warps x 1 stage when a
    head dim exceeds 128 (D = DV = 256 fits 32 rows, not 64 with 2 stages)."""
    wide = max(tiles["BLOCK_D"], tiles["BLOCK_DV"]) > 128
    block_m = 32 if by_block and wide else 128 if by_block else 64
    warps = 8 if by_block else by_query(tiles)["num_warps"]
    return dict(BLOCK_M=max(block_m, pow2(rows), pow2(G)), num_warps=warps, num_stages=1 if by_block and wide else 2)
