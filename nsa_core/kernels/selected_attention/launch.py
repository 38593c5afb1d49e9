"""Launchers of the selected-attention kernels: checks what the kernels support, allocates
outputs, picks tiles and grids, builds the CSR index of the dK/dV pass. No host syncs.

Queries after other keys (a sequence-parallel shard, queries after cached keys): TQ queries over TK
keys, query i at key position q_offset + i; both schemes take the offset, dK / dV cover all TK keys.
Packed documents (batch 1): `packed_block_table` turns document-relative block indices into virtual
blocks (one per block of each document, at most T // block + N of them) and gives the kernels their
key ranges, one launch for all; the forward runs by block for small groups, by tile up to
TILE_FWD_PACKED_MAX_ROWS rows, else by query (choose_scheme).

The by-tile forward (forward_by_tile.py) puts TOKENS consecutive queries x their head set into one
tile of TILE_FWD_ROWS rows and walks the union of their blocks (tile_union.py); it pays when
neighbouring queries' selections overlap (benchmarks/NOTES.md, the selected branch). Its rule:
choose_scheme (TILE_FWD_PACKED_MAX_ROWS, TILE_FWD_PLAIN_MAX_ROWS; FWD_SCHEME forces a scheme).

Tiles, warps and stages come from tiles.py (pure functions of shapes and dtype, checked ahead of time
for an H100 by tools/smem_sweep.py and tests/kernels/test_smem.py). Shared memory rule (227 KiB a
block on an H100, checked by Triton only at launch): a key tile (keys x padded head dims x element
size) of at most 128 KiB, a larger block run as sub-blocks (autograd splits the selection:
split_blocks.py); dK/dV by query 32 rows with a 128 KiB key tile; by block only where its tiles fit
(choose_scheme: forward key tile + 128 rows <= 192 KiB, 1 stage above 64 KiB; backward key tiles up
to 64 KiB, 1 stage at 64 KiB in 16 bits), else by query. Measured tiles that fit are kept.

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, HI heads of the selection
(HKV: shared by a group, or HQ), TQ queries, TK keys (T: both, a plain batch), S slots, D / DV head
dims, NB key blocks.
"""

from __future__ import annotations

import math

import torch
import triton

from nsa_core.kernels import outputs
from nsa_core.kernels.limits import MAX_BLOCK_SIZE, dtype_reason, head_dim_reason
from nsa_core.kernels.row_dot import row_dot
from nsa_core.kernels.selected_attention import tile_union
from nsa_core.kernels.selected_attention import tiles as tile_rules
from nsa_core.kernels.selected_attention.backward import (
    selected_attention_bwd_dkdv_kernel,
    selected_attention_bwd_dq_kernel,
    sum_dq_partials_kernel,
)
from nsa_core.kernels.selected_attention.backward_by_tile import selected_attention_bwd_dq_by_tile_kernel
from nsa_core.kernels.selected_attention.forward import selected_attention_fwd_kernel
from nsa_core.kernels.selected_attention.forward_by_tile import selected_attention_fwd_by_tile_kernel
from nsa_core.kernels.selected_attention.forward_by_block import (
    merge_partials_kernel,
    selected_attention_fwd_by_block_kernel,
)

# by-block scheme: per-(query, slot) partials are written to memory; above this size, by query
PARTIALS_BUDGET_BYTES = 8 * 2**30
# by-block pays when few query rows share a selection (each key block is then loaded once, not per
# query); measured on an H100 at 64k (benchmarks/NOTES.md): forward up to 4 rows; backward up to 8
# rows with dq added atomically, up to 4 with deterministic dq partials
BY_BLOCK_MAX_ROWS_FWD = 4
BY_BLOCK_MAX_ROWS_BWD = 8
BY_BLOCK_MAX_ROWS_BWD_DETERMINISTIC = 4
# programs sharing one key block's entries in the by-block forward: enough programs to fill the
# GPU (measured on an H100: 4 splits save 14% at 16k, nothing at 64k; benchmarks/NOTES.md)
BY_BLOCK_FWD_PROGRAMS = 4096
BY_BLOCK_FWD_SPLITS: int | None = None  # fixed count, overriding the rule (tests)
# by-tile forward: rows of a tile (queries x head set; 64: Hopper's warpgroup MMA height) and keys
# per step (whole blocks: the union's blocks gathered into one key tile of at least this many keys)
TILE_FWD_ROWS = 64
TILE_FWD_KEYS = 64
# the by-tile forward's rule (to be timed on the GPU: benchmarks.kernels.selected_tiles): packed
# documents with at most this many query rows per selection (the by-block forward does not take
# them; by query pads G rows to 16), and plain batches (0: never; by block / by query stay)
TILE_FWD_PACKED_MAX_ROWS = 8
TILE_FWD_PLAIN_MAX_ROWS = 0
FWD_SCHEME: str | None = None  # "by_query", "by_block" or "by_tile": forces the forward's scheme (tests)
# the backward's dQ kernel by tile (backward_by_tile.py) where the backward runs by query, up to this many
# query rows per selection (0: never; not timed yet); DQ_SCHEME ("by_query" / "by_tile") forces it (tests)
TILE_DQ_MAX_ROWS = 0
DQ_SCHEME: str | None = None
# tokens per program of the backward's dq-partials merge (measured on an H100 at 64k, G=1: 32 tokens
# 0.84 ms vs 16 tokens 1.17). The forward's merge keeps a program per query row: a 32-token tile
# measured slower there (G=1 0.60 vs 0.43 ms, G=4 2.3 ms).
SUM_DQ_TOKENS = 32


def kernel_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> str | None:
    reason = dtype_reason(q) or head_dim_reason(q.shape[-1], v.shape[-1])
    if reason is not None:
        return reason
    if block_size > MAX_BLOCK_SIZE:
        return f"kernels take block_size up to {MAX_BLOCK_SIZE}, got {block_size}"
    o = torch.empty((*q.shape[:-1], v.shape[-1]), device="meta")  # the output's size, nothing allocated
    return outputs.too_large_reason(q=q, k=k, v=v, output=o)


_pow2 = tile_rules.pow2
_rows = tile_rules.rows


def _tiles(q: torch.Tensor, v: torch.Tensor, block_size: int) -> dict:
    return tile_rules.key_tiles(q.shape[-1], v.shape[-1], block_size, q.dtype)


def _slots_per_step(S: int, tiles: dict, override: int | None) -> int:
    return tile_rules.slots_per_step(S, tiles) if override is None else override


def deterministic() -> bool:
    """torch.use_deterministic_algorithms(True) asks for bit-identical reruns: the by-block backward
    then sums dq partials instead of adding dq atomically."""
    return torch.are_deterministic_algorithms_enabled()


def choose_scheme(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, backward: bool = False,
                  tiles: dict | None = None, packed: bool = False) -> str:
    """"by_query" (a program per query token and head set, loading its selected blocks),
    "by_block" (a program per key block, walking the queries that selected it; forward partial
    results, and in the deterministic backward dq partials, go through memory) or, forward only,
    "by_tile" (a program per tile of consecutive queries, walking the union of their blocks).

    Measured on an H100 (benchmarks/RESULTS.md): by block wins the forward up to 4 query rows per
    selection, the backward up to 8 (atomic dq) or 4 (dq partials). Partials must fit the budget,
    and the by-block tiles (tiles: the kernels' key tiles, _tiles) shared memory (tiles.by_block_fits).
    Packed documents, forward: by block where it may run (H200, the LM shape of 65,536 packed tokens,
    4 rows: 2.4 / 2.2 ms against by tile's 3.2 / 2.3 and by query's 6.5, random / overlapping
    selections: benchmarks.kernels.selected_tiles), else by tile up to TILE_FWD_PACKED_MAX_ROWS rows
    (5-8 rows not timed yet), else by query. Plain batches by tile up to TILE_FWD_PLAIN_MAX_ROWS (0:
    at G = 16 it wins only with overlapping selections, 3.6 vs 5.3 ms at 16k, and loses with random
    ones, 8.0 vs 5.3)."""
    B, HQ, T, D = q.shape
    rows, _ = _rows(HQ, k.shape[1], idx.shape[1])
    if not backward:
        if FWD_SCHEME is not None:
            return FWD_SCHEME
        if packed and _by_block(q, idx, rows, backward, tiles) == "by_block":
            return "by_block"
        if rows <= (TILE_FWD_PACKED_MAX_ROWS if packed else TILE_FWD_PLAIN_MAX_ROWS) and \
                (tiles is None or tile_fits(tiles, rows)):
            return "by_tile"
        if packed:
            return "by_query"
    return _by_block(q, idx, rows, backward, tiles)


def _by_block(q: torch.Tensor, idx: torch.Tensor, rows: int, backward: bool, tiles: dict | None) -> str:
    """"by_block" where its rows, partials and tiles allow, else "by_query"."""
    B, HQ, T, D = q.shape
    slots = idx.shape[-1] + 1
    if not backward:
        partial_bytes, max_rows = B * HQ * T * slots * (D * q.element_size() + 8), BY_BLOCK_MAX_ROWS_FWD
    elif deterministic():
        partial_bytes, max_rows = B * HQ * T * slots * D * 4, BY_BLOCK_MAX_ROWS_BWD_DETERMINISTIC
    else:
        partial_bytes, max_rows = 0, BY_BLOCK_MAX_ROWS_BWD
    if tiles is not None and not tile_rules.by_block_fits(tiles, backward):
        return "by_query"
    return "by_block" if rows <= max_rows and partial_bytes <= PARTIALS_BUDGET_BYTES else "by_query"


def packed_block_table(idx: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx (1, HI, T, S) int32 document-relative (-1: invalid), cu_seqlens (N + 1,) -> (virtual block
    ids of the same shape, -1 where invalid or past the document; table (2 * NVB + T,) int32: the
    first key of every virtual block, then its end, then each token's own virtual block). Device ops only."""
    T = idx.shape[2]
    cu = cu_seqlens.to(device=idx.device, dtype=torch.int64)
    num_blocks = (cu[1:] - cu[:-1] + block_size - 1) // block_size  # (N,)
    first_block = torch.cat((cu.new_zeros(1), num_blocks.cumsum(0)))  # (N + 1,) virtual id of each document's block 0
    nvb = T // block_size + num_blocks.numel()  # sum of ceil(n_i / block) <= T // block + N
    vblk = torch.arange(nvb, device=idx.device)
    doc = (torch.searchsorted(first_block[:-1], vblk, right=True) - 1).clamp(min=0)
    j = vblk - first_block[doc]
    used = j < num_blocks[doc]
    first_key = torch.where(used, cu[doc] + j * block_size, 0)
    end_key = torch.where(used, torch.minimum(first_key + block_size, cu[doc + 1]), 0)
    tokens = torch.arange(T, device=idx.device)
    tok_doc = torch.searchsorted(cu, tokens, right=True) - 1
    own = first_block[tok_doc] + (tokens - cu[tok_doc]) // block_size
    table = torch.cat((first_key, end_key, own)).to(torch.int32)
    ok = (idx >= 0) & (idx < num_blocks[tok_doc].view(1, 1, T, 1))
    virtual = torch.where(ok, idx + first_block[tok_doc].view(1, 1, T, 1).to(idx.dtype), torch.full_like(idx, -1))
    return virtual.contiguous(), table


def _packed(table: torch.Tensor | None, TK: int, block_size: int) -> tuple[int, dict]:
    """Key blocks (the grid of the dK/dV pass) and the kernels' packing arguments."""
    if table is None:
        return math.ceil(TK / block_size), dict(W=0, PACKED=False)
    return (table.numel() - TK) // 2, dict(W=(table.numel() - TK) // 2, PACKED=True)


def _csr_index_dtype(idx: torch.Tensor) -> torch.dtype:
    return torch.int32 if idx.numel() < 2**31 else torch.int64


def csr_size(idx: torch.Tensor, num_kv_heads: int, block_size: int, num_keys: int,
             table: torch.Tensor | None = None) -> tuple[tuple[int], tuple[int], torch.dtype]:
    """Shapes and dtype of build_csr's (entries, offsets) for idx (B, HI, TQ, S) over num_keys keys
    (packed documents: over table's virtual blocks)."""
    num_blocks, _ = _packed(table, num_keys, block_size)
    return (idx.numel(),), (idx.shape[0] * num_kv_heads * num_blocks + 1,), _csr_index_dtype(idx)


def selected_attention_fwd_with_csr(q, k, v, idx, gates, block_size: int, causal: bool, scale: float, window: int = 0,
                                    table: torch.Tensor | None = None, q_offset: int = 0):
    """selected_attention_fwd, plus the CSR index (entries, offsets) when the forward built one (by
    block) for the backward to reuse, else two empty tensors."""
    scheme = choose_scheme(q, k, idx, tiles=_tiles(q, v, block_size), packed=table is not None)
    if scheme == "by_block":
        return _fwd_by_block(q, k, v, idx, gates, block_size, causal, scale, window, None, q_offset=q_offset, table=table)
    o, lse = selected_attention_fwd(q, k, v, idx, gates, block_size, causal, scale, window,
                                    scheme="by_tile" if scheme == "by_tile" else "by_query", table=table, q_offset=q_offset)
    no_csr = [torch.empty(0, device=q.device, dtype=torch.int32) for _ in range(2)]  # two tensors: outputs may not alias
    return o, lse, *no_csr


def selected_attention_fwd(q, k, v, idx, gates, block_size: int, causal: bool, scale: float, window: int = 0,
                           slots_per_step: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                           scheme: str | None = None, splits: int | None = None, table: torch.Tensor | None = None,
                           q_offset: int = 0, block_m: int | None = None):
    """q (B, HQ, TQ, D), k (B, HKV, TK, D), v (B, HKV, TK, DV), idx (B, HI, TQ, S) int32 with -1 for
    invalid slots, gates (B, HI, TQ, S) or None -> o (B, HQ, TQ, DV), lse (B, HQ, TQ) float32.
    Query i sits at key position q_offset + i (q_offset + TQ <= TK).
    table: packed documents (packed_block_table; idx holds virtual blocks), by query or by tile.
    Tiles, warps and stages: tiles.py's rules; slots_per_step, num_warps, num_stages override them (by
    block: num_warps, num_stages and block_m, the CSR entry rows per step; splits, the programs sharing
    a key block's entries; by tile: block_m, the tile's rows, and slots_per_step, its blocks per step)."""
    scheme = scheme or choose_scheme(q, k, idx, tiles=_tiles(q, v, block_size), packed=table is not None)
    if scheme == "by_tile":
        return _fwd_by_tile(q, k, v, idx, gates, block_size, causal, scale, window, table, q_offset, block_m,
                            slots_per_step, num_warps, num_stages)
    if scheme == "by_block":
        return _fwd_by_block(q, k, v, idx, gates, block_size, causal, scale, window, num_warps, splits,
                             block_m=block_m, num_stages=num_stages, q_offset=q_offset, table=table)[:2]
    B, HQ, TQ, _ = q.shape
    HKV, TK, HI, S = k.shape[1], k.shape[2], idx.shape[1], idx.shape[-1]
    rows, rows_p = _rows(HQ, HKV, HI)
    o = outputs.new_output(B, HQ, TQ, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = outputs.new_output(B, HQ, TQ, device=q.device, dtype=torch.float32)
    tiles = _tiles(q, v, block_size)
    launch_cfg = tile_rules.by_query(tiles)
    grid = (TQ * B * HI,)  # split back by split_pid: any batch x heads
    _, packing = _packed(table, TK, block_size)
    selected_attention_fwd_kernel[grid](
        q, k, v, idx, gates if gates is not None else idx, o, lse, idx if table is None else table, packing["W"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        TQ, TK, q_offset, HI, scale,
        S=S, SLOTS_PER_STEP=_slots_per_step(S, tiles, slots_per_step), G=HQ // HKV, ROWS=rows, ROWS_P=rows_p,
        CAUSAL=causal, HAS_GATES=gates is not None, WINDOW=window, PACKED=packing["PACKED"],
        num_warps=num_warps or launch_cfg["num_warps"], num_stages=num_stages or launch_cfg["num_stages"], **tiles,
    )
    return o, lse


def tile_shape(rows: int, block_n: int, block_r: int | None = None, blocks_per_step: int | None = None) -> dict:
    """The by-tile forward's tile: BLOCK_R rows (at least the head set, padded), TOKENS = BLOCK_R //
    rows queries, UNION_PER_STEP blocks per key tile (TILE_FWD_KEYS keys, at least one block)."""
    block_r = block_r or max(TILE_FWD_ROWS, _pow2(rows, 16))
    block_r = max(_pow2(block_r), _pow2(rows, 16))
    per_step = blocks_per_step or max(1, TILE_FWD_KEYS // block_n)
    return dict(BLOCK_R=block_r, TOKENS=block_r // rows, UNION_PER_STEP=_pow2(per_step))


def tile_fits(tiles: dict, rows: int, dq: bool = False) -> bool:
    """Whether the by-tile forward's (dq: dQ kernel's, rows of q and dO) tiles for this head set fit
    shared memory (tiles.by_tile_fits)."""
    shape = tile_shape(rows, tiles["BLOCK_N"])
    return tile_rules.by_tile_fits(tiles, shape["BLOCK_R"] * (2 if dq else 1), shape["UNION_PER_STEP"])


def dq_scheme(rows: int, tiles: dict) -> str:
    """The by-query backward's dQ kernel: "by_tile" up to TILE_DQ_MAX_ROWS rows where its tiles fit,
    else "by_query"; DQ_SCHEME forces it."""
    if DQ_SCHEME is not None:
        return DQ_SCHEME
    return "by_tile" if rows <= TILE_DQ_MAX_ROWS and tile_fits(tiles, rows, dq=True) else "by_query"


def _tile_selection(idx, block_size, causal, table, q_offset, tokens):
    """The tiles' slots (B, HI, NT * TOKENS, S1), unions and counts (tile_union.py)."""
    own = tile_union.own_blocks(idx.shape[2], block_size, q_offset, table, idx.device) if causal else None
    sel = tile_union.tile_slots(idx, own, tokens)
    union, count = tile_union.tile_union(sel, tokens)
    return sel, union, count


def _fwd_by_tile(q, k, v, idx, gates, block_size, causal, scale, window, table, q_offset, block_r=None,
                 blocks_per_step=None, num_warps=None, num_stages=None):
    """The by-tile forward: the tiles' unions (tile_union.py, device ops), then one program per tile."""
    B, HQ, TQ, _ = q.shape
    HKV, TK, HI, S = k.shape[1], k.shape[2], idx.shape[1], idx.shape[-1]
    rows, _ = _rows(HQ, HKV, HI)
    tiles = _tiles(q, v, block_size)
    shape = tile_shape(rows, tiles["BLOCK_N"], block_r, blocks_per_step)
    tokens = shape["TOKENS"]
    sel, union, count = _tile_selection(idx, block_size, causal, table, q_offset, tokens)
    NT = sel.shape[2] // tokens
    S1 = sel.shape[-1]
    o = outputs.new_output(B, HQ, TQ, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = outputs.new_output(B, HQ, TQ, device=q.device, dtype=torch.float32)
    cfg = tile_rules.by_tile(tiles, shape["BLOCK_R"], shape["UNION_PER_STEP"])
    _, packing = _packed(table, TK, block_size)
    selected_attention_fwd_by_tile_kernel[(NT * B * HI,)](
        q, k, v, sel, gates if gates is not None else sel, union, count, o, lse, sel if table is None else table,
        packing["W"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        TQ, TK, q_offset, HI, NT, scale,
        S=S, S1=S1, S1_P=_pow2(S1), G=HQ // HKV, ROWS=rows, **shape,
        CAUSAL=causal, HAS_GATES=gates is not None, WINDOW=window, PACKED=packing["PACKED"],
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"], **tiles,
    )
    return o, lse


def _fwd_by_block(q, k, v, idx, gates, block_size, causal, scale, window, num_warps, splits=None, block_m=None,
                  num_stages=None, q_offset=0, table=None):
    """Entry rows per step, warps, stages: tiles.fwd_by_block (block_m, num_warps, num_stages override it).
    table: packed documents (idx holds virtual blocks; a program per virtual block)."""
    B, HQ, TQ, _ = q.shape
    HKV, TK, HI, S, DV = k.shape[1], k.shape[2], idx.shape[1], idx.shape[-1], v.shape[-1]
    G = HQ // HKV
    rows, _ = _rows(HQ, HKV, HI)
    num_blocks, packing = _packed(table, TK, block_size)
    entries, offsets = build_csr(idx, HKV, num_blocks, rows)
    o_part = outputs.new_output(B, HQ, TQ, S + 1, DV, device=q.device, dtype=q.dtype)
    m_part = outputs.new_output(B, HQ, TQ, S + 1, device=q.device, dtype=torch.float32)
    l_part = outputs.new_output(B, HQ, TQ, S + 1, device=q.device, dtype=torch.float32)
    tiles = _tiles(q, v, block_size)
    cfg = tile_rules.fwd_by_block(tiles, G)
    block_m = max(block_m, _pow2(G)) if block_m else cfg["BLOCK_M"]
    splits = splits or BY_BLOCK_FWD_SPLITS or max(1, min(4, BY_BLOCK_FWD_PROGRAMS // (num_blocks * B * HKV)))
    selected_attention_fwd_by_block_kernel[(num_blocks * B * HKV, splits)](
        q, k, v, entries, offsets, gates if gates is not None else m_part, o_part, m_part, l_part,
        offsets if table is None else table, packing["W"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        TQ, TK, q_offset, HI, HKV, num_blocks, scale, splits,
        S=S, G=G, ROWS=rows, ROWS_P=_pow2(rows), G_P=_pow2(G), BLOCK_M=block_m, CAUSAL=causal,
        HAS_GATES=gates is not None, WINDOW=window, PACKED=packing["PACKED"], num_warps=num_warps or cfg["num_warps"],
        num_stages=num_stages or cfg["num_stages"], **tiles,
    )
    o = outputs.new_output(B, HQ, TQ, DV, device=q.device, dtype=q.dtype)
    lse = outputs.new_output(B, HQ, TQ, device=q.device, dtype=torch.float32)
    merge_partials_kernel[(TQ * B * HQ,)](
        o_part, m_part, l_part, idx, o, lse, o.stride(0), o.stride(1), o.stride(2), TQ, HQ, HI, G,
        S=S, SP=_pow2(S + 1), DV=DV, BLOCK_DV=tiles["BLOCK_DV"], CAUSAL=causal, num_warps=1,
    )
    return o, lse, entries, offsets


def build_csr(idx: torch.Tensor, num_kv_heads: int, num_blocks: int, rows: int):
    """Entries of idx (B, HI, TQ, S) grouped by (batch, kv head, key block): (entries, offsets).

    entries: linear indices into idx, sorted by group (stable); offsets (B * HKV * NB + 1,):
    group g's entries are entries[offsets[g]:offsets[g + 1]]. Invalid slots (-1) are dropped
    to a sentinel group past the end. One stable sort of the narrowest integer group keys, and the offsets by
    binary search in the sorted keys (no counting pass)."""
    B, HI, T, S = idx.shape
    group_size = HI * rows // num_kv_heads
    num_groups = B * num_kv_heads * num_blocks
    # the narrowest key type holding the sentinel: a radix sort takes one pass per key byte
    key_dtype = torch.int16 if num_groups < 2**15 - 1 else torch.int32 if num_groups < 2**31 - 1 else torch.int64
    head_of = torch.arange(HI, device=idx.device, dtype=key_dtype) * rows // group_size  # selection head -> its kv head
    batch = torch.arange(B, device=idx.device, dtype=key_dtype).view(B, 1, 1, 1)
    group = (batch * num_kv_heads + head_of.view(1, HI, 1, 1)) * num_blocks + idx.to(key_dtype)
    group = torch.where(idx >= 0, group, torch.full_like(group, num_groups)).flatten()
    sorted_groups, order = torch.sort(group, stable=True)
    offsets = torch.searchsorted(sorted_groups, torch.arange(num_groups + 1, device=idx.device, dtype=key_dtype))
    return order.to(_csr_index_dtype(idx)), offsets.to(_csr_index_dtype(idx))


def selected_attention_bwd(do, q, k, v, o, lse, idx, gates, block_size: int, causal: bool, scale: float, window: int = 0,
                           csr: tuple[torch.Tensor, torch.Tensor] | None = None, slots_per_step: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None, dkdv_block_m: int | None = None,
                           dkdv_warps: int | None = None, scheme: str | None = None, dq_atomic: bool | None = None,
                           table: torch.Tensor | None = None, q_offset: int = 0, dq_by: str | None = None):
    """Gradients (dq, dk, dv, dgates or None) of selected_attention_fwd. By query: a dQ kernel
    walks each query's blocks and a dK/dV kernel each block's queries. By block: the dK/dV
    kernel also computes each (query row, block)'s dq and the gate gradients, and adds the dq
    atomically into a float32 accumulator (dq_atomic, the default unless deterministic()) or
    writes it as a partial that a second pass sums. csr: the forward's (entries, offsets), if any.
    By query, dQ runs by tile (backward_by_tile.py) where dq_scheme says so (dq_by forces it).

    Tiles, warps and stages: tiles.by_query (dQ) and tiles.dkdv; num_warps (dQ, and dK/dV by query),
    num_stages (both), dkdv_block_m and dkdv_warps override them."""
    scheme = scheme or choose_scheme(q, k, idx, backward=True, tiles=_tiles(q, v, block_size))
    dq_atomic = not deterministic() if dq_atomic is None else dq_atomic
    B, HQ, TQ, D = q.shape
    HKV, TK, HI, S = k.shape[1], k.shape[2], idx.shape[1], idx.shape[-1]
    G = HQ // HKV
    rows, rows_p = _rows(HQ, HKV, HI)
    do = do.contiguous()
    delta = row_dot(do, o.contiguous())  # (B, HQ, TQ) float32
    by_block = scheme == "by_block"
    dgates = None
    if gates is not None:  # by block, only valid slots are written: the others stay zero
        dgates = torch.zeros(idx.shape, device=q.device, dtype=torch.float32) if by_block else \
            outputs.new_output(*idx.shape, device=q.device, dtype=torch.float32)
    tiles = _tiles(q, v, block_size)
    dq_cfg = tile_rules.by_query(tiles)
    warps = num_warps or dq_cfg["num_warps"]
    if by_block and dq_atomic:
        dq_part = torch.zeros(B, HQ, TQ, D, device=q.device, dtype=torch.float32)
    elif by_block:
        dq_part = outputs.new_output(B, HQ, TQ, S + 1, D, device=q.device, dtype=torch.float32)
    else:
        dq_part = delta
        dq = outputs.new_output(*q.shape, device=q.device, dtype=q.dtype)
        if (dq_by or dq_scheme(rows, tiles)) == "by_tile":
            dgates = _launch_dq_by_tile(do, q, k, v, lse, delta, idx, gates, dq, causal, scale, window, rows, tiles,
                                        table, q_offset)
        else:
            _launch_dq(do, q, k, v, lse, delta, idx, gates, dq, dgates, causal, scale, window, slots_per_step, warps,
                       num_stages or dq_cfg["num_stages"], rows, rows_p, tiles, table, q_offset)
    num_blocks, packing = _packed(table, TK, block_size)
    entries, offsets = csr if csr is not None and csr[0].numel() == idx.numel() else build_csr(idx, HKV, num_blocks, rows)
    dk = outputs.new_output(B, HKV, TK, D, device=q.device, dtype=k.dtype)
    dv = outputs.new_output(B, HKV, TK, v.shape[-1], device=q.device, dtype=v.dtype)
    entry_rows = _pow2(rows)
    dkdv_cfg = tile_rules.dkdv(tiles, G, rows, by_block)
    block_m = max(dkdv_block_m, entry_rows, _pow2(G)) if dkdv_block_m else dkdv_cfg["BLOCK_M"]
    selected_attention_bwd_dkdv_kernel[(num_blocks * B * HKV,)](
        q, k, v, do, lse, delta, entries, offsets, gates if gates is not None else lse, dk, dv, dq_part,
        dgates if dgates is not None else lse, offsets if table is None else table, packing["W"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        TQ, TK, q_offset, HI, HKV, num_blocks, scale,
        S=S, G=G, ROWS=rows, ROWS_P=entry_rows, G_P=_pow2(G), BLOCK_M=block_m, CAUSAL=causal,
        HAS_GATES=gates is not None, DQ_PARTIAL=by_block, DQ_ATOMIC=dq_atomic, WINDOW=window, PACKED=packing["PACKED"],
        num_warps=dkdv_warps or (dkdv_cfg["num_warps"] if by_block or num_warps is None else num_warps),
        num_stages=num_stages or dkdv_cfg["num_stages"], **tiles,
    )
    if by_block and dq_atomic:
        dq = dq_part.to(q.dtype)
    elif by_block:
        dq = outputs.new_output(*q.shape, device=q.device, dtype=q.dtype)
        sum_dq_partials_kernel[(triton.cdiv(TQ, SUM_DQ_TOKENS) * B * HQ,)](
            dq_part, idx, dq, dq.stride(0), dq.stride(1), dq.stride(2), TQ, HQ, HI,
            S=S, D=D, BLOCK_D=tiles["BLOCK_D"], BLOCK_T=SUM_DQ_TOKENS, CAUSAL=causal, num_warps=4,
        )
    return dq, dk, dv, dgates


def _launch_dq_by_tile(do, q, k, v, lse, delta, idx, gates, dq, causal, scale, window, rows, tiles, table=None,
                       q_offset=0):
    """dQ by tile into dq; returns the gate gradients (B, HI, TQ, S) float32 (the heads' row partials
    summed) or None."""
    B, HQ, TQ, _ = q.shape
    HKV, TK, HI, S = k.shape[1], k.shape[2], idx.shape[1], idx.shape[-1]
    shape = tile_shape(rows, tiles["BLOCK_N"])
    sel, union, count = _tile_selection(idx, tiles["BLOCK"], causal, table, q_offset, shape["TOKENS"])
    NT = sel.shape[2] // shape["TOKENS"]
    dgate_rows = None
    if gates is not None:
        dgate_rows = outputs.new_output(B, HI, rows, TQ, S, device=q.device, dtype=torch.float32)
    cfg = tile_rules.by_tile(tiles, shape["BLOCK_R"], shape["UNION_PER_STEP"])
    _, packing = _packed(table, TK, tiles["BLOCK"])
    selected_attention_bwd_dq_by_tile_kernel[(NT * B * HI,)](
        q, k, v, do, lse, delta, sel, gates if gates is not None else sel, union, count, dq,
        dgate_rows if dgate_rows is not None else lse, sel if table is None else table, packing["W"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        TQ, TK, q_offset, HI, NT, scale,
        S=S, S1=sel.shape[-1], S1_P=_pow2(sel.shape[-1]), G=HQ // HKV, ROWS=rows, **shape,
        CAUSAL=causal, HAS_GATES=gates is not None, WINDOW=window, PACKED=packing["PACKED"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **tiles,
    )
    return dgate_rows.sum(dim=2) if dgate_rows is not None else None


def _launch_dq(do, q, k, v, lse, delta, idx, gates, dq, dgates, causal, scale, window, slots_per_step, warps, num_stages,
               rows, rows_p, tiles, table=None, q_offset=0):
    B, HQ, TQ, _ = q.shape
    HKV, TK, HI, S = k.shape[1], k.shape[2], idx.shape[1], idx.shape[-1]
    _, packing = _packed(table, TK, tiles["BLOCK"])
    selected_attention_bwd_dq_kernel[(TQ * B * HI,)](
        q, k, v, do, lse, delta, idx, gates if gates is not None else idx, dq, dgates if dgates is not None else lse,
        idx if table is None else table, packing["W"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        TQ, TK, q_offset, HI, scale,
        S=S, SLOTS_PER_STEP=_slots_per_step(S, tiles, slots_per_step), G=HQ // HKV, ROWS=rows, ROWS_P=rows_p,
        CAUSAL=causal, HAS_GATES=gates is not None, WINDOW=window, PACKED=packing["PACKED"], num_warps=warps,
        num_stages=num_stages, **tiles,
    )
