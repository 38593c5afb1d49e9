"""Launcher of the paged decode kernels: tiles, the number of splits, partial buffers, grids.

No host synchronisation: every choice comes from shapes and the device's SM count (Python ints),
never from tensor values, so a call can be captured in a CUDA graph.

Dimension legend: B batch, HQ query heads, HKV kv heads, HI lists (HKV or HQ), K query tokens,
S slots per list, P physical pages, PAGE keys per page, D / DV head dims, NS splits.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from nsa_core.kernels import outputs
from nsa_core.kernels.decode.kernel import paged_decode_merge_kernel, paged_decode_split_kernel
from nsa_core.kernels.limits import KERNEL_DTYPES, MAX_HEAD_DIM  # noqa: F401  (op.py checks with them)

PAGE_SIZES = (16, 32, 64, 128)
# Tiles (not yet measured on a GPU): keys per tile and query heads per program, smaller when a
# head dim exceeds 128 so the float32 accumulator of BLOCK_R x DV stays in registers.
KEYS_PER_TILE, KEYS_PER_TILE_WIDE = 64, 32
MAX_ROWS, MAX_ROWS_WIDE = 64, 32
# The split rule (flash-decoding): fill about one wave of PROGRAMS_PER_SM programs per SM, each split
# keeping at least MIN_TILES_PER_SPLIT key tiles; at most MAX_SPLITS partials per row to merge.
PROGRAMS_PER_SM = 2
MIN_TILES_PER_SPLIT = 2
MAX_SPLITS = 64
FULL_WAVE = 0.8  # programs filling this much of a wave need no splits
WAVE_MARGIN = 0.85  # the fewest splits whose wave efficiency is within this factor of the best


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter: no splits unless asked)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def tiles(HQ: int, HI: int, page_size: int, D: int, DV: int, dtype: torch.dtype) -> dict:
    """The kernels' compile-time tiles for these shapes."""
    block_d, block_dv = _pow2(D, 16), _pow2(DV, 16)
    wide = max(block_d, block_dv) > 128
    block_n = KEYS_PER_TILE_WIDE if wide else KEYS_PER_TILE
    block_r = min(_pow2(HQ // HI, 16), MAX_ROWS_WIDE if wide else MAX_ROWS)
    return dict(PAGE=page_size, BLOCK_N=block_n, TILE_PAGES=max(1, block_n // page_size),
                CHUNKS=max(1, page_size // block_n), BLOCK_R=block_r, D=D, DV=DV, BLOCK_D=block_d, BLOCK_DV=block_dv,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def choose_num_splits(programs: int, slot_groups: int, chunks: int, sms: int, *,
                      programs_per_sm: int = PROGRAMS_PER_SM, min_tiles: int = MIN_TILES_PER_SPLIT) -> int:
    """Splits of every list, from Python ints only. programs: programs per split (B * HI * K * head
    tiles); slot_groups: the list's slots in groups of one key tile's pages (a split takes whole
    groups); chunks: key tiles per group; sms: the device's SM count.

    One split when the programs already fill FULL_WAVE of a wave (sms * programs_per_sm programs).
    Otherwise the fewest splits whose wave efficiency (waves / whole waves) is within WAVE_MARGIN
    of the best reachable, with at least min_tiles key tiles per split (as flash-attention's
    split heuristic)."""
    wave = sms * programs_per_sm
    max_splits = min(MAX_SPLITS, slot_groups // math.ceil(min_tiles / chunks))
    if programs <= 0 or max_splits <= 1 or programs >= FULL_WAVE * wave:
        return 1

    def efficiency(n: int) -> float:
        waves = programs * splits_used(slot_groups, n) / wave
        return waves / math.ceil(waves)

    best = max(efficiency(n) for n in range(1, max_splits + 1))
    n = next(n for n in range(1, max_splits + 1) if efficiency(n) >= WAVE_MARGIN * best)
    return splits_used(slot_groups, n)


def splits_used(slot_groups: int, num_splits: int) -> int:
    """Splits left once each takes a whole number of groups (none is empty); at least 1."""
    if slot_groups <= 0:
        return 1
    return math.ceil(slot_groups / math.ceil(slot_groups / max(1, min(num_splits, slot_groups))))


def split_plan(programs: int, slots: int, cfg: dict, sms: int, num_splits: int | None = None) -> tuple[int, int]:
    """(splits, slots per split) of lists of `slots` slots whose programs (programs per split) run on
    `sms` SMs: num_splits (clamped to the list's tile groups) or choose_num_splits' count; a split
    holds whole groups of one key tile's pages."""
    groups = math.ceil(slots / cfg["TILE_PAGES"])
    if num_splits is None:
        num_splits = choose_num_splits(programs, groups, cfg["CHUNKS"], sms)
    num_splits = splits_used(groups, num_splits)
    return num_splits, max(1, math.ceil(groups / num_splits)) * cfg["TILE_PAGES"]


def head_tiles(HQ: int, HI: int, cfg: dict) -> int:
    """Programs (tiles of BLOCK_R rows) that share one list's HQ / HI query heads."""
    return math.ceil(HQ // HI / cfg["BLOCK_R"])


def split_warps(*cfgs: dict) -> int:
    """Warps of a split program: 8 from 32 rows x 128 dims (4 spilled registers there with 4; ptxas
    for sm_90; not timed)."""
    big = max(c["BLOCK_R"] * max(c["BLOCK_D"], c["BLOCK_DV"]) for c in cfgs) >= 4096
    return 8 if big else 4


def merge_warps(block_dv: int, splits_p: int) -> int:
    return 1 if block_dv * splits_p <= 2048 else 4


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


LIST_RULES = {"listed": 0, "listed_and_own": 1, "window": 2}  # kernel.py's LISTED, LISTED_AND_OWN, WINDOW_PAGES


def window_slots(window: int, page_size: int) -> int:
    """Pages a window of `window` keys before a query (and the query's own) can touch."""
    return window // page_size + 2


def paged_decode_fwd(q, k_pages, v_pages, block_table, blocks, valid, hi, lo, scale: float,
                     num_splits: int | None = None, lists: str = "listed", window: int = 0) -> torch.Tensor:
    """q (B, HQ, K, D), k_pages (P, HKV, PAGE, D), v_pages (P, HKV, PAGE, DV), block_table (B, max_pages),
    blocks / valid (B, HI, K, S), hi / lo (B, K) or lo None -> o (B, HQ, K, DV) in q's dtype (inputs
    validated by the caller). lists: "listed" (the slots of blocks / valid), "listed_and_own" (those,
    then each query's own page hi // PAGE), "window" (the pages of keys hi - window ... hi; blocks,
    valid and lo None, one list per kv head). num_splits: a fixed split count (clamped to the list's
    tile groups) or None for choose_num_splits. The pool is never copied unless its last stride is not 1."""
    B, HQ, K, _ = q.shape
    P, HKV, PAGE, _ = k_pages.shape
    DV = v_pages.shape[-1]
    hi = hi.contiguous()
    if lists == "window":
        HI, S = HKV, window_slots(window, PAGE)
        blocks = valid = hi  # not read
    else:
        HI, S = blocks.shape[1], blocks.shape[-1] + (lists == "listed_and_own")
        blocks, valid = blocks.contiguous(), valid.contiguous().view(torch.uint8)
    cfg = tiles(HQ, HI, PAGE, q.shape[-1], DV, q.dtype)
    q, k_pages, v_pages, block_table = (_unit_last_stride(t) for t in (q, k_pages, v_pages, block_table))
    tiles_per_list = head_tiles(HQ, HI, cfg)
    programs = B * HI * K * tiles_per_list
    num_splits, slots_per_split = split_plan(programs, S, cfg, sm_count(q.device), num_splits)

    o = outputs.new_output(B, HQ, K, DV, device=q.device, dtype=q.dtype)
    if programs == 0:
        return o
    partials = num_splits > 1
    if partials:
        o_part = outputs.new_output(B, HQ, K, num_splits, DV, device=q.device, dtype=torch.float32)
        m_part = outputs.new_output(B, HQ, K, num_splits, device=q.device, dtype=torch.float32)
        l_part = outputs.new_output(B, HQ, K, num_splits, device=q.device, dtype=torch.float32)
    else:
        o_part = m_part = l_part = o  # not read or written
    paged_decode_split_kernel[(programs, num_splits)](
        q, k_pages, v_pages, block_table, blocks, valid, hi, hi if lo is None else lo.contiguous(), o, o_part, m_part,
        l_part, *q.stride()[:3], *k_pages.stride()[:3], *v_pages.stride()[:3], block_table.stride(0),
        HQ, HI, K, S, HQ // HI, HI // HKV, tiles_per_list, block_table.shape[1], P, slots_per_split, num_splits, scale,
        HAS_LO=lo is not None, WRITE_PARTIALS=partials, LISTS=LIST_RULES[lists], WINDOW=int(window),
        num_warps=split_warps(cfg), **cfg,
    )
    if partials:
        paged_decode_merge_kernel[(B * HQ * K,)](
            o_part, m_part, l_part, o, num_splits, SPLITS_P=_pow2(num_splits), DV=DV, BLOCK_DV=cfg["BLOCK_DV"],
            num_warps=merge_warps(cfg["BLOCK_DV"], _pow2(num_splits)),
        )
    return o
