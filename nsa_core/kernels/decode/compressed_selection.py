"""A decoding step's compressed attention and block selection in one launch: the launcher of
selection_kernel.py (tiles, grid, outputs), its torch.library op with a fake implementation (so
torch.compile(fullgraph=True) traces it) and the public function. Forward only (inference).

No host synchronisation: every choice comes from shapes and Python ints, never from tensor values,
so a step that calls it can be captured in a CUDA graph. Top-k in the same kernel: each program owns
one selection list, so its block scores never leave it; the only memory it shares with nothing is a
scratch row of one float per compressed block (the per-block scores gathered back after a barrier).
When the lists are too few to fill the GPU (batch 1, few kv heads), mean-logit scoring splits each
list's slots over several programs (launch.choose_num_splits with this kernel's wave and tile
minimum, SPLIT_PROGRAMS_PER_SM / SPLIT_MIN_TILES) and a second launch merges them and selects: two
launches instead of one.

Dimension legend: B batch, HQ query heads, HKV kv heads, HI lists (HKV when a group shares its
selection, else HQ), K query tokens, P physical pages, CPAGE slots per page, M memory tokens,
C compressed blocks in the capacity, NB selection blocks in it, S slots out, D / DV head dims.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
from torch import Tensor

from nsa_core.kernels import outputs
from nsa_core.kernels.decode.launch import choose_num_splits, sm_count, splits_used
from nsa_core.kernels.decode.selection_kernel import (MEAN_LOGITS, SUMMED_PROBS, compressed_selection_kernel,
                                                      compressed_split_kernel, selection_merge_kernel)
from nsa_core.kernels.limits import KERNEL_DTYPES, MAX_HEAD_DIM

IMPORTANCE_CODES = {"mean_logits": MEAN_LOGITS.value, "summed_probs": SUMMED_PROBS.value}
KEYS_PER_TILE, KEYS_PER_TILE_WIDE = 64, 32  # compressed slots per tile (head dims above 128: fewer)
# Its split rule (launch.choose_num_splits): a wave of 4 programs per SM and at least 4 key tiles per
# split. Measured on an H200 (64 q / 4 kv heads of 128, bf16, graphed; benchmarks/NOTES.md): against
# the paged kernels' rule (2 per SM, 2 tiles) 64.5 vs 70 us at 64k x 16, 98 vs 113 at 128k x 16,
# 41 vs 49 at 128k x 1 (the merge of many splits costs more than it saves when the lists are few);
# 2 us slower at 8k.
SPLIT_PROGRAMS_PER_SM, SPLIT_MIN_TILES = 4, 4
# the unforced slots by one tl.topk of packed int64 keys instead of a max and a min per slot (same choices);
# off: no faster on an H100 (benchmarks/decode/step_warps.py's "sorted top-k" rows; RESULTS.md)
SORTED_TOP_K = False
MAX_SCORE_ELEMENTS = 1 << 15  # NB x W block-score gathers one program holds (the selection's registers)


def merge_kernel_warps(big_rows: bool, big_scores: bool) -> int:
    """Warps of selection_merge_kernel: 8 where its rows x head dim reach 4096 or its block-score gather
    NB x W 8192 elements (their registers), else 4 (benchmarks/decode/step_warps.py sweeps it)."""
    return 8 if big_rows or big_scores else 4


@functools.lru_cache(maxsize=None)
def rounded(value: float, dtype: torch.dtype) -> float:
    """value rounded to dtype, as a Python float (a CPU tensor once per value and dtype: no op per step)."""
    return float(torch.tensor(value, dtype=dtype))


def masked_score(dtype: torch.dtype) -> float:
    """The reference's fill of invisible compressed logits (reference.compressed_attention.masked_score)."""
    return float(-torch.finfo(dtype).max // 10)


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


def score_width(stride: int, selection_block_size: int, compress_block: int, importance: str,
                interpolated: bool = False) -> int:
    """W: the compressed blocks (interpolated: the tokens) one selection block's score reads."""
    if interpolated and importance == "mean_logits" and selection_block_size < stride:
        return selection_block_size
    if importance == "summed_probs":
        return max(1, -(-(selection_block_size + compress_block) // stride) + 1)
    return max(1, selection_block_size // stride)


def num_blocks(num_compressed: int, stride: int, selection_block_size: int) -> int:
    """NB: the selection blocks C compressed blocks score (reference.selection.num_scored_blocks)."""
    if selection_block_size >= stride:
        return num_compressed // (selection_block_size // stride)
    return num_compressed * (stride // selection_block_size)


def too_large_reason(num_compressed: int, stride: int, selection_block_size: int, compress_block: int,
                     importance: str, interpolated: bool = False) -> str | None:
    """Why the fused kernel cannot hold these blocks' scores in one program, or None."""
    nb = num_blocks(num_compressed, stride, selection_block_size)
    width = score_width(stride, selection_block_size, compress_block, importance, interpolated)
    if _pow2(nb) * _pow2(width) > MAX_SCORE_ELEMENTS:
        return (f"the fused step selection holds {MAX_SCORE_ELEMENTS} block-score gathers per program, "
                f"these {nb} blocks need {_pow2(nb) * _pow2(width)}")
    return None


def compressed_selection_fwd(q: Tensor, ck_pages: Tensor, cv_pages: Tensor, table: Tensor, positions: Tensor,
                             num_memory: int, num_compressed: int, stride: int, selection_block_size: int,
                             compress_block: int, importance: str, interpolated: bool, share: bool, slots: int,
                             forced_initial: int, forced_local: int, scale: float, null_logit: float,
                             threshold: float, num_splits: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs validated by the caller -> o (B, HQ, K, DV) in q's dtype, indices (B, HI, K, S) int64,
    valid (B, HI, K, S) int8, probs (B, HI, K, S) in q's dtype. num_splits: the slot splits of every
    list (mean logits only; clamped to the slot tiles), None for choose_num_splits."""
    B, HQ, K, D = q.shape
    HKV, CPAGE, DV = ck_pages.shape[1], ck_pages.shape[2], cv_pages.shape[-1]
    HI = HKV if share else HQ
    nb = num_blocks(num_compressed, stride, selection_block_size)
    block_d, block_dv = _pow2(D, 16), _pow2(DV, 16)
    q, ck_pages, cv_pages, table = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, ck_pages, cv_pages, table))
    positions = positions.contiguous()
    o = outputs.new_output(B, HQ, K, DV, device=q.device, dtype=q.dtype)
    indices = outputs.new_output(B, HI, K, slots, device=q.device, dtype=torch.int64)
    valid = outputs.new_output(B, HI, K, slots, device=q.device, dtype=torch.int8)
    probs = outputs.new_output(B, HI, K, slots, device=q.device, dtype=q.dtype)
    scratch = outputs.new_output(B * HI * K, max(num_compressed, 1), device=q.device, dtype=torch.float32)
    programs = B * HI * K
    if programs == 0:
        return o, indices, valid, probs
    rows = _pow2(HQ // HI, 16)
    interpolated = interpolated and importance == "mean_logits" and selection_block_size < stride
    block_w = _pow2(score_width(stride, selection_block_size, compress_block, importance, interpolated))
    block_n = KEYS_PER_TILE_WIDE if max(block_d, block_dv) > 128 else KEYS_PER_TILE
    strides = (*q.stride()[:3], *ck_pages.stride()[:3], *cv_pages.stride()[:3], table.stride(0))
    common = dict(M=num_memory, STRIDE=stride, CPAGE=CPAGE, BLOCK_N=block_n, BLOCK_R=rows, D=D, DV=DV,
                  BLOCK_D=block_d, BLOCK_DV=block_dv, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    free = slots - forced_initial - forced_local
    selecting = dict(SEL=selection_block_size, CBLOCK=compress_block, INTERPOLATED=interpolated, SLOTS=slots,
                     FORCED_I=forced_initial, FORCED_L=forced_local, BLOCK_NB=_pow2(nb), BLOCK_W=block_w,
                     TOPK_P=_pow2(free) if SORTED_TOP_K and 0 < free <= nb else 0)
    big_rows = rows * max(block_d, block_dv) >= 4096
    big_scores = _pow2(nb) * block_w >= 8192
    slot_tiles = -(-(num_memory + num_compressed) // block_n)
    if importance != "mean_logits":
        num_splits = 1
    elif num_splits is None:
        num_splits = choose_num_splits(programs, slot_tiles, 1, sm_count(q.device),
                                       programs_per_sm=SPLIT_PROGRAMS_PER_SM, min_tiles=SPLIT_MIN_TILES)
    num_splits = splits_used(slot_tiles, int(num_splits))  # none empty of tiles
    tiles_per_split = -(-slot_tiles // num_splits)
    if num_splits == 1:
        compressed_selection_kernel[(programs,)](
            q, ck_pages, cv_pages, table, positions, o, scratch, indices, probs, valid, *strides,
            HQ, HI, K, HQ // HI, HI // HKV, num_compressed, nb, scale, threshold, null_logit, masked_score(q.dtype),
            IMPORTANCE=IMPORTANCE_CODES[importance], **common, **selecting,
            num_warps=8 if big_rows or big_scores else 4,
        )
        return o, indices, valid, probs
    o_part = outputs.new_output(B * HQ * K, num_splits, DV, device=q.device, dtype=torch.float32)
    m_part = outputs.new_output(B * HQ * K, num_splits, device=q.device, dtype=torch.float32)
    l_part = outputs.new_output(B * HQ * K, num_splits, device=q.device, dtype=torch.float32)
    compressed_split_kernel[(programs, num_splits)](
        q, ck_pages, cv_pages, table, positions, o_part, m_part, l_part, scratch, *strides,
        HQ, HI, K, HQ // HI, HI // HKV, num_compressed, scale, tiles_per_split, num_splits, **common,
        num_warps=8 if big_rows else 4,
    )
    selection_merge_kernel[(programs,)](
        positions, o_part, m_part, l_part, scratch, o, indices, probs, valid,
        HQ, HI, K, HQ // HI, num_compressed, nb, num_splits, threshold, null_logit, masked_score(q.dtype),
        STRIDE=stride, BLOCK_R=rows, DV=DV, BLOCK_DV=block_dv, **selecting,
        num_warps=merge_kernel_warps(big_rows, big_scores),
    )
    return o, indices, valid, probs


@torch.library.custom_op("nsa::compressed_selection_step", mutates_args=())
def _compressed_selection(q: Tensor, ck_pages: Tensor, cv_pages: Tensor, table: Tensor, positions: Tensor,
                          num_memory: int, num_compressed: int, stride: int, selection_block_size: int,
                          compress_block: int, importance: str, interpolated: bool, share: bool, slots: int,
                          forced_initial: int, forced_local: int, scale: float, null_logit: float,
                          threshold: float, num_splits: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return compressed_selection_fwd(q, ck_pages, cv_pages, table, positions, num_memory, num_compressed, stride,
                                    selection_block_size, compress_block, importance, interpolated, share, slots,
                                    forced_initial, forced_local, scale, null_logit, threshold, num_splits)


@_compressed_selection.register_fake
def _compressed_selection_fake(q, ck_pages, cv_pages, table, positions, num_memory, num_compressed, stride,
                               selection_block_size, compress_block, importance, interpolated, share, slots,
                               forced_initial, forced_local, scale, null_logit, threshold, num_splits):
    B, HQ, K, _ = q.shape
    HI = ck_pages.shape[1] if share else HQ
    return (q.new_empty(B, HQ, K, cv_pages.shape[-1]), q.new_empty(B, HI, K, slots, dtype=torch.int64),
            q.new_empty(B, HI, K, slots, dtype=torch.int8), q.new_empty(B, HI, K, slots))


def compressed_selection_step(
    q: Tensor,  # (B, HQ, K, D), unrotated
    ck_pages: Tensor,  # (P, HKV, CPAGE, D): the compressed slots, memory tokens first
    cv_pages: Tensor,  # (P, HKV, CPAGE, DV)
    table: Tensor,  # (B, pages per row) int32 / int64: logical page -> physical page
    positions: Tensor,  # (B, K) int64: the queries' positions
    *,
    num_memory: int,
    num_compressed: int,
    stride: int,
    selection_block_size: int,
    compress_block: int,
    importance: str,
    interpolated: bool,
    share: bool,
    slots: int,
    forced_initial: int,
    forced_local: int,
    scale: float,
    null_logit: float,
    threshold: float,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A decoding step's compressed branch and block selection, causal. Query k of row b at position
    pos attends the memory tokens (slots 0 .. M - 1) and the compressed blocks c completed before it
    ((c + 1) * stride <= pos, slot M + c): o (B, HQ, K, DV). From the same logits it scores the NB
    selection blocks of num_compressed compressed blocks (importance "mean_logits": the mean logit
    over the list's heads and the block's compressed blocks; "summed_probs": the log of the
    compressed attention's probabilities (the memory tokens left out) summed over the compressed
    blocks that overlap the block and over the list's heads; `interpolated` with mean logits and
    selection blocks smaller than the stride: the compressed blocks' means linearly interpolated to
    tokens and averaged over the block, reference.selection.block_importance), softmaxes them with a null slot of
    logit null_logit and writes `slots` choices per list: the forced blocks first, then the best of
    the rest (ties: the lowest index), valid above `threshold` (a float of the scores' dtype).
    -> (o, indices (B, HI, K, S) int64, valid (bool), probs (q's dtype)). Forward only.
    num_splits: how many programs share one list's slots with mean logits (None: chosen from the
    device's SM count; summed probabilities always take one)."""
    _check_inputs(q, ck_pages, cv_pages, table, positions, importance, slots)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None (chosen from the device) or an int >= 1, got {num_splits!r}")
    threshold = rounded(float(threshold), q.dtype)
    o, indices, valid, probs = _compressed_selection(
        q, ck_pages, cv_pages, table, positions, int(num_memory), int(num_compressed), int(stride),
        int(selection_block_size), int(compress_block), importance, bool(interpolated), bool(share), int(slots),
        int(forced_initial),
        int(forced_local), float(scale), float(null_logit), threshold, num_splits)
    return o, indices, valid.view(torch.bool), probs


def _check_inputs(q, ck_pages, cv_pages, table, positions, importance, slots) -> None:
    device = q.device
    for name, t, dims in (("q", q, 4), ("ck_pages", ck_pages, 4), ("cv_pages", cv_pages, 4), ("table", table, 2),
                          ("positions", positions, 2)):
        if not isinstance(t, Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-dim tensor, got {tuple(getattr(t, 'shape', ()))}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device} (q's device), got {t.device}")
    if q.dtype not in KERNEL_DTYPES or ck_pages.dtype != q.dtype or cv_pages.dtype != q.dtype:
        raise TypeError(f"q, ck_pages and cv_pages must share one of {KERNEL_DTYPES}, got {q.dtype}, "
                        f"{ck_pages.dtype}, {cv_pages.dtype}")
    if table.dtype not in (torch.int32, torch.int64) or positions.dtype != torch.int64:
        raise TypeError(f"table must be int32 / int64 and positions int64, got {table.dtype}, {positions.dtype}")
    B, HQ, K, D = q.shape
    if ck_pages.shape[-1] != D or cv_pages.shape[:3] != ck_pages.shape[:3] or HQ % ck_pages.shape[1] != 0:
        raise ValueError(f"ck_pages must be (P, HKV, CPAGE, D={D}) with HKV dividing {HQ} and cv_pages (P, HKV, "
                         f"CPAGE, DV), got {tuple(ck_pages.shape)}, {tuple(cv_pages.shape)}")
    if not (0 < D <= MAX_HEAD_DIM and 0 < cv_pages.shape[-1] <= MAX_HEAD_DIM):
        raise ValueError(f"head dims must be in 1..{MAX_HEAD_DIM}, got D={D}, DV={cv_pages.shape[-1]}")
    if table.shape[0] != B or positions.shape != (B, K):
        raise ValueError(f"table must be (B={B}, pages) and positions (B, K) = ({B}, {K}), got "
                         f"{tuple(table.shape)}, {tuple(positions.shape)}")
    if importance not in IMPORTANCE_CODES:
        raise ValueError(f"importance must be one of {sorted(IMPORTANCE_CODES)}, got {importance!r}")
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"the decode kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}")
