"""Block selection in one Triton pass: scale, mask, softmax with the null slot, top-k.

Reads the pooled block scores (q . pooled compressed keys, unscaled) of a chunk of queries and
writes each query's k chosen blocks, their probabilities and validity, as
`reference.selection.select_top_blocks` on `reference.pooled_selection.pooled_block_logits` computes them (the
PyTorch twin), without the masked logits, the probabilities or the int64 sort keys in memory.
Same arithmetic: logits rounded to the scores' dtype after scaling, probabilities rounded to it
before the top-k (so ties are the twin's ties), ties to the lowest block index. Forced blocks
(FORCED_I initial, FORCED_L local, causal): their slots first, the twin's `forced_blocks` order and
validity, then the top-k of the unforced blocks.

Packed documents (block_topk_packed, constexpr PACKED): each row reads the window of its document's
blocks in a row of pooled slots (reference/packed_selection.py is the layout and the twin) and writes
document-relative indices, -1 past the document's blocks. The plain path compiles without it.

Dimension legend: R rows = B x H x TC (TC queries of the chunk), NB scored blocks (packed: the
window W), P pooled slots of a packed row, K chosen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_core.kernels import outputs

ROW_ELEMENTS = 4096  # rows x padded blocks held by one program
MAX_BLOCKS = 4 * ROW_ELEMENTS  # one row of this many blocks per program is the most it holds


@triton.jit
def forced_block(j: tl.constexpr, own, FORCED_I: tl.constexpr, NB):
    """Forced slot j of a query whose own block is `own` (reference.selection.forced_blocks): the
    initial blocks 0..FORCED_I-1, then the local blocks own-1, own-2, ... -> (block clamped into
    [0, NB), whether the block exists for this query)."""
    if j < FORCED_I:
        chosen = own * 0 + j
        forced_valid = j < own
    else:
        chosen = own - 1 - (j - FORCED_I)
        forced_valid = (chosen >= 0) & (chosen >= FORCED_I)
    return tl.minimum(tl.maximum(chosen, 0), NB - 1), forced_valid


@triton.jit
def block_topk_kernel(
    SCORES, INDICES, PROBS, VALID, POS, FIRST, NBLK,
    R, NB, TC, first_pos, scale, threshold,
    stride_sr, stride_ir,
    K: tl.constexpr, SEL: tl.constexpr, CAUSAL: tl.constexpr, MASK_OWN: tl.constexpr, NULL_LOGIT: tl.constexpr,
    PACKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_NB: tl.constexpr,
    FORCED_I: tl.constexpr = 0, FORCED_L: tl.constexpr = 0,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # rows x stride pass 2**31 elements
    blocks = tl.arange(0, BLOCK_NB)
    in_rows = rows < R
    if PACKED:  # each query: its position, its document's first column and block count
        query = rows % TC
        pos = tl.load(POS + query, mask=in_rows, other=0)
        cols = tl.load(FIRST + query, mask=in_rows, other=0)[:, None] + blocks[None, :]
        doc_blocks = tl.load(NBLK + query, mask=in_rows, other=0)
        exists = blocks[None, :] < doc_blocks[:, None]
        slots_of_doc = tl.maximum(doc_blocks, FORCED_I + FORCED_L)  # a lone document's slots
    else:
        pos = first_pos + rows % TC
        cols = blocks[None, :]
        exists = (blocks < NB)[None, :]
    visible = in_rows[:, None] & exists
    if CAUSAL:
        visible &= (blocks[None, :] + 1) * SEL <= pos[:, None]
    if MASK_OWN:
        visible &= blocks[None, :] != (pos // SEL)[:, None]
    score_dtype = SCORES.dtype.element_ty
    x = tl.load(SCORES + rows[:, None] * stride_sr + cols, mask=visible, other=0.0)
    x = (x.to(tl.float32) * scale).to(score_dtype).to(tl.float32)
    x = tl.where(visible, x, float("-inf"))
    top = tl.maximum(tl.max(x, axis=1), NULL_LOGIT)
    e = tl.exp(x - top[:, None])
    total = tl.sum(e, axis=1) + tl.exp(NULL_LOGIT - top)
    p = (e / total[:, None]).to(score_dtype).to(tl.float32)
    out = rows * stride_ir
    if FORCED_I + FORCED_L > 0:  # forced slots first (reference.selection.forced_blocks), then the rest
        own = pos // SEL
        for j in tl.static_range(FORCED_I + FORCED_L):
            chosen, forced_valid = forced_block(j, own, FORCED_I, NB)
            value = tl.sum(tl.where(blocks[None, :] == chosen[:, None], p, 0.0), axis=1)
            if PACKED:  # a block or a slot the lone document lacks: index -1, probability 0
                there = (chosen < doc_blocks) & (j < slots_of_doc)
                chosen = tl.where(there, chosen, -1)
                value = tl.where(there, value, 0.0)
                forced_valid = forced_valid & there
            tl.store(INDICES + out + j, chosen.to(tl.int64), mask=in_rows)
            tl.store(PROBS + out + j, value.to(score_dtype), mask=in_rows)
            tl.store(VALID + out + j, forced_valid.to(tl.int8), mask=in_rows)
        forced = ((blocks[None, :] < FORCED_I) | (blocks[None, :] >= own[:, None] - FORCED_L)) & \
            (blocks[None, :] < own[:, None])
        p = tl.where(forced, 0.0, p)  # the other slots rank the unforced blocks
    p = tl.where(exists, p, -1.0)  # no block there: chosen only once the blocks are exhausted
    for slot in tl.static_range(FORCED_I + FORCED_L, K):
        best = tl.max(p, axis=1)
        choice = tl.min(tl.where(p == best[:, None], blocks[None, :], BLOCK_NB), axis=1)
        p = tl.where(blocks[None, :] == choice[:, None], -2.0, p)
        if PACKED:  # past the document's blocks: index -1, probability 0 (plain rows: K <= NB)
            found = (best >= 0.0) & (slot < slots_of_doc)
            choice = tl.where(found, choice, -1)
            best = tl.where(found, best, 0.0)
        tl.store(INDICES + out + slot, choice.to(tl.int64), mask=in_rows)
        tl.store(PROBS + out + slot, best.to(score_dtype), mask=in_rows)
        tl.store(VALID + out + slot, (best > threshold).to(tl.int8), mask=in_rows)


def _launch(scores: torch.Tensor, k: int, first_pos: int, selection_block_size: int, causal: bool, mask_own: bool,
            scale: float, null_logit: float, threshold: float, packed: tuple | None, width: int,
            forced_initial: int, forced_local: int):
    """Both ops' launch: rows of scores (..., TC, P); plain rows read NB = P blocks, packed rows the
    `width` columns from their document's first (packed = (positions, first_slot, num_blocks) (TC,)).
    max(k, forced_initial + forced_local) slots come out (the forced ones first)."""
    k = slots_out(k, forced_initial, forced_local)
    TC, P = scores.shape[-2], scores.shape[-1]
    flat = scores.contiguous().reshape(-1, P)
    R = flat.shape[0]
    indices = outputs.new_output(R, k, device=scores.device, dtype=torch.int64)
    probs = outputs.new_output(R, k, device=scores.device, dtype=scores.dtype)
    valid = outputs.new_output(R, k, device=scores.device, dtype=torch.int8)
    NB = P if packed is None else width
    block_nb = triton.next_power_of_2(max(NB, 1))
    block_r = max(1, ROW_ELEMENTS // block_nb)
    per_query = (flat, flat, flat) if packed is None else tuple(t.contiguous() for t in packed)
    if R > 0:
        block_topk_kernel[(triton.cdiv(R, block_r),)](
            flat, indices, probs, valid, *per_query, R, NB, TC, first_pos, scale, threshold, flat.stride(0),
            indices.stride(0), K=k, SEL=selection_block_size, CAUSAL=causal, MASK_OWN=mask_own, NULL_LOGIT=null_logit,
            PACKED=packed is not None, BLOCK_R=block_r, BLOCK_NB=block_nb, FORCED_I=forced_initial,
            FORCED_L=forced_local, num_warps=8 if block_nb * block_r >= 8192 else 4,
        )
    shape = (*scores.shape[:-1], k)
    return indices.view(shape), valid.view(shape), probs.view(shape)


def slots_out(k: int, forced_initial: int, forced_local: int) -> int:
    """Slots of a selection of the k best blocks with these forced ones (select_top_blocks: every
    forced slot is kept, the rest fill up to k)."""
    return max(k, forced_initial + forced_local)


def _fake_outputs(scores: torch.Tensor, k: int, forced_initial: int = 0,
                  forced_local: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (*scores.shape[:-1], slots_out(k, forced_initial, forced_local))
    return (scores.new_empty(shape, dtype=torch.int64), scores.new_empty(shape, dtype=torch.int8),
            scores.new_empty(shape))


@torch.library.custom_op("nsa::block_topk", mutates_args=())
def _block_topk(scores: torch.Tensor, k: int, scale: float, first_pos: int, selection_block_size: int, causal: bool,
                mask_own: bool, null_logit: float, threshold: float, forced_initial: int,
                forced_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(scores, k, first_pos, selection_block_size, causal, mask_own, scale, null_logit, threshold,
                   None, 0, forced_initial, forced_local)


@_block_topk.register_fake
def _block_topk_fake(scores, k, scale, first_pos, selection_block_size, causal, mask_own, null_logit, threshold,
                     forced_initial, forced_local):
    return _fake_outputs(scores, k, forced_initial, forced_local)


@torch.library.custom_op("nsa::block_topk_packed", mutates_args=())
def _block_topk_packed(scores: torch.Tensor, k: int, positions: torch.Tensor, first_slot: torch.Tensor,
                       num_blocks: torch.Tensor, width: int, scale: float, selection_block_size: int, causal: bool,
                       mask_own: bool, null_logit: float, threshold: float, forced_initial: int,
                       forced_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(scores, k, 0, selection_block_size, causal, mask_own, scale, null_logit, threshold,
                   (positions, first_slot, num_blocks), width, forced_initial, forced_local)


@_block_topk_packed.register_fake
def _block_topk_packed_fake(scores, k, positions, first_slot, num_blocks, width, scale, selection_block_size, causal,
                            mask_own, null_logit, threshold, forced_initial, forced_local):
    return _fake_outputs(scores, k, forced_initial, forced_local)


def block_topk(scores: torch.Tensor, k: int, *, scale: float, first_pos: int, selection_block_size: int, causal: bool,
               mask_own: bool, null_logit: float, threshold: float, forced_initial: int = 0,
               forced_local: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores (B, H, TC, NB) for queries first_pos ... first_pos + TC - 1 -> indices (B, H, TC, k)
    int64, valid (bool), probs (scores' dtype). 1 <= k <= NB. `null_logit` is the logit of the null
    slot in front of the blocks; a slot is valid when its probability exceeds `threshold` (given in
    the scores' dtype, as the twin compares). Forced blocks (causal): the first forced_initial +
    forced_local slots hold them as reference.selection.forced_blocks gives them (valid where they
    exist), the rest the best unforced blocks; max(k, forced) slots. Not differentiable
    (use_diff_topk takes the twin)."""
    threshold = float(torch.tensor(threshold, dtype=scores.dtype))  # a Python float: no device read
    indices, valid, probs = _block_topk(scores, int(k), float(scale), int(first_pos), int(selection_block_size),
                                        bool(causal), bool(mask_own), float(null_logit), threshold,
                                        int(forced_initial), int(forced_local))
    return indices, valid.view(torch.bool), probs


def block_topk_packed(scores: torch.Tensor, k: int, *, positions: torch.Tensor, first_slot: torch.Tensor,
                      num_blocks: torch.Tensor, width: int, scale: float, selection_block_size: int, causal: bool,
                      mask_own: bool, null_logit: float, threshold: float, forced_initial: int = 0,
                      forced_local: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed documents: scores (B, H, TC, P) of TC queries against every pooled slot; query t (of
    positions (TC,) in its document) sees the `width` slots from first_slot[t], the first
    num_blocks[t] of them its document's blocks (reference/packed_selection.py). -> indices
    (B, H, TC, k) document-relative, -1 (invalid, probability 0) past the document's blocks;
    valid, probs and forced blocks (counted from each document's start) as block_topk. k >= 1, any
    width (0 included)."""
    threshold = float(torch.tensor(threshold, dtype=scores.dtype))
    indices, valid, probs = _block_topk_packed(scores, int(k), positions, first_slot, num_blocks, int(width),
                                               float(scale), int(selection_block_size), bool(causal), bool(mask_own),
                                               float(null_logit), threshold, int(forced_initial), int(forced_local))
    return indices, valid.view(torch.bool), probs
