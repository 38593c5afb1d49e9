"""Tiles, warps and stages of the selected-attention kernels: pure functions of the shapes and the
dtype (Python ints, no tensors), called by launch.py and by the ahead-of-time checks of shared
memory (tools/smem_sweep.py, tests/kernels/test_smem.py).

Shared memory (an H100 gives a block 227 KiB; Triton checks only at launch) grows with the bytes
of a key tile, keys x (BLOCK_D + BLOCK_DV) x element size, and of a tile of query rows. Where the
measured tiles fit, the measured choices stay; elsewhere (wide heads, float32), compiled for sm_90
with Triton 3.6 and 3.9 (tools/smem_sweep.py; benchmarks/NOTES.md):
- by query (forward, dQ): key tiles of at most 128 KiB, 128 keys or fewer (float32 above 128 dims:
  64). A block larger than that runs as sub-blocks (kernel_block: the op splits the selection,
  split_blocks.py);
- dK/dV by query: 32 query rows, not 64, with a 128 KiB key tile;
- by block (key tile held by the program): forward when the key tile and 128 query rows take at
  most 192 KiB, 1 stage with a 128 KiB key tile; backward with key tiles up to 64 KiB (1 stage at
  64 KiB in 16 bits), 64 rows where 128 rows of q and dO would take more than 64 KiB (float32, 128
  dims). Otherwise by query.

Dimension legend: D / DV head dims, G query heads per kv head, rows query heads per program row
set (G when heads share the selection, else 1), S slots.
"""

from __future__ import annotations

import torch
import triton


def pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


KiB = 1024
MAX_KEY_TILE = 128 * KiB  # by query, and the largest key tile any kernel takes
MAX_BY_BLOCK_BWD_KEY_TILE = 64 * KiB
MAX_BY_BLOCK_FWD_TILES = 192 * KiB  # key tile + 128 query rows
MAX_BY_BLOCK_BWD_ROWS = 64 * KiB  # 128 rows of q and dO


def key_tiles(D: int, DV: int, block_size: int, dtype: torch.dtype) -> dict:
    """The constexprs every kernel shares: the block (BLOCK, padded to BLOCK_N keys), the head dims
    (padded to BLOCK_D / BLOCK_DV) and the dots' precision ("ieee" exactly for float32)."""
    return dict(BLOCK=block_size, BLOCK_N=pow2(block_size, 16), D=D, DV=DV, BLOCK_D=pow2(D, 16), BLOCK_DV=pow2(DV, 16),
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _row_bytes(tiles: dict) -> int:
    """Bytes of one key (or query) row of K and V (q and dO): padded head dims x element size."""
    return (tiles["BLOCK_D"] + tiles["BLOCK_DV"]) * (4 if tiles["PRECISION"] == "ieee" else 2)


def _key_tile(tiles: dict) -> int:
    return tiles["BLOCK_N"] * _row_bytes(tiles)


def max_keys(tiles: dict) -> int:
    """Keys of the by-query kernels' key tile: 128, fewer where 128 keys pass MAX_KEY_TILE."""
    keys = 128
    while keys > 16 and keys * _row_bytes(tiles) > MAX_KEY_TILE:
        keys //= 2
    return keys


def kernel_block(D: int, DV: int, block_size: int, dtype: torch.dtype) -> int:
    """The block the kernels run: the selection's, or where its padded size passes max_keys, its
    largest even part that fits (block / f for the smallest f dividing it): split_blocks.py."""
    keys = max_keys(key_tiles(D, DV, 16, dtype))
    f = 1
    while pow2(block_size // f, 16) > keys or block_size % f:
        f += 1
    return block_size // f


def rows(HQ: int, HKV: int, HI: int) -> tuple[int, int]:
    """Query heads per program row set: the group when heads share the selection, else one; and
    that count padded for the by-query kernels (16 rows: a full tensor-core tile)."""
    r = HQ // HKV if HI == HKV else 1
    return r, pow2(r, 16)


def slots_per_step(S: int, tiles: dict) -> int:
    """Selected blocks gathered into one key tile of the by-query kernels: tiles of max_keys keys."""
    return max(1, min(pow2(S), max_keys(tiles) // tiles["BLOCK_N"]))


def by_query(tiles: dict) -> dict:
    """Warps and stages of the by-query forward and dQ kernels (and the by-query dK/dV's warps): 4
    warps up to 128 dims (measured in bf16), 8 above, and 8 in float32: its dots run on FMAs, whose
    operands and accumulators spill from 4 warps' registers (ptxas for sm_90, D 128, block 64: forward
    5 KB and dQ 27 KB of spill stores with 4 warps, none with 8; dK/dV 134 KB vs 59 KB), and ptxas
    takes minutes over it (cold compile of the paper shape in float32: 97 s with 4 warps; NOTES.md)."""
    wide = tiles["BLOCK_D"] > 128 or tiles["PRECISION"] == "ieee"
    return dict(num_warps=8 if wide else 4, num_stages=2)


def by_block_fits(tiles: dict, backward: bool) -> bool:
    """Whether the by-block kernel's tiles fit shared memory (else launch.choose_scheme goes by query)."""
    if backward:
        return _key_tile(tiles) <= MAX_BY_BLOCK_BWD_KEY_TILE
    element = 4 if tiles["PRECISION"] == "ieee" else 2
    return _key_tile(tiles) + 128 * tiles["BLOCK_D"] * element <= MAX_BY_BLOCK_FWD_TILES


def by_tile(tiles: dict, block_r: int, blocks_per_step: int) -> dict:
    """Warps and stages of the by-tile forward (block_r query rows, blocks_per_step blocks per key
    tile): the by-query forward's warps (8 for float32 / wide heads), 2 stages while the key tile
    takes at most 64 KiB, else 1 (the by-block forward's rule). Not yet measured on a GPU."""
    stages = 2 if blocks_per_step * _key_tile(tiles) <= 64 * KiB else 1
    return dict(num_warps=by_query(tiles)["num_warps"], num_stages=stages)


def by_tile_fits(tiles: dict, block_r: int, blocks_per_step: int) -> bool:
    """Whether the by-tile forward's tiles fit shared memory (else launch.choose_scheme goes by
    query): its key tile and block_r query rows within MAX_BY_BLOCK_FWD_TILES, as by block."""
    element = 4 if tiles["PRECISION"] == "ieee" else 2
    return blocks_per_step * _key_tile(tiles) + block_r * tiles["BLOCK_D"] * element <= MAX_BY_BLOCK_FWD_TILES


def fwd_by_block(tiles: dict, G: int) -> dict:
    """Entry rows per step, warps and stages of the by-block forward: 128 rows, 4 warps, 2 stages,
    measured on an H100 at 64k (benchmarks/NOTES.md): G=1 2.07 ms vs 2.80 with 64 rows, G=4 7.48
    vs 9.21; 8 warps or 3 stages were slower. 1 stage with a key tile over 64 KiB (shared memory).
    Float32 (dots on FMAs): 64 rows, 8 warps. With 128 rows x 4 warps the compile for sm_90 at D 80 (padded to
    128), block 128 did not finish: the support matrix's fp32-80-80-128-4 ran over 170 s on the H100
    before its time limit, and ptxas over 3 minutes on this project's 2-core CPU before it was
    stopped; there 64 rows x 8 warps compile in 20 s, 128 rows x 8 warps took over 2.5 minutes."""
    stages = 2 if _key_tile(tiles) <= 64 * KiB else 1
    if tiles["PRECISION"] == "ieee":
        return dict(BLOCK_M=max(64, pow2(G)), num_warps=8, num_stages=stages)
    return dict(BLOCK_M=max(128, pow2(G)), num_warps=4, num_stages=stages)


def dkdv(tiles: dict, G: int, rows: int, by_block: bool) -> dict:
    """Query rows per step, warps and stages of the dK/dV kernel. Measured on an H100 at 64k
    (benchmarks/NOTES.md): by query 64 rows x 4 warps (8 above 128 dims); by block 128 rows x 8
    warps (G=4: 11.8 ms vs 15.9 with 4 warps, 19.3 with 64 rows), 32 rows x 8 warps x 1 stage when a
    head dim exceeds 128 (D = DV = 256 fits 32 rows, not 64 with 2 stages). Shared memory: by query
    32 rows with a 128 KiB key tile; by block 64 rows where 128 would pass MAX_BY_BLOCK_BWD_ROWS, and
    1 stage with a 64 KiB key tile in 16 bits (D 128, block 128: 264704 B with 2 stages in Triton 3.6,
    163840 with 1; 128 rows kept, 64 rows measured 1.6x slower at block 64)."""
    wide = max(tiles["BLOCK_D"], tiles["BLOCK_DV"]) > 128
    stages = 2
    if by_block:
        block_m = 32 if wide else 128 if 128 * _row_bytes(tiles) <= MAX_BY_BLOCK_BWD_ROWS else 64
        if wide or (tiles["PRECISION"] != "ieee" and _key_tile(tiles) >= MAX_BY_BLOCK_BWD_KEY_TILE):
            stages = 1
    else:
        block_m = 64 if _key_tile(tiles) < MAX_KEY_TILE else 32
    warps = 8 if by_block else by_query(tiles)["num_warps"]
    return dict(BLOCK_M=max(block_m, pow2(rows), pow2(G)), num_warps=warps, num_stages=stages)
