"""Block selection in one Triton pass: scale, mask, softmax with the null slot, top-k.

Reads the pooled block scores (q . pooled compressed keys, unscaled) of a chunk of queries and
writes each query's k chosen blocks, their probabilities and validity, as
`reference.selection.select_top_blocks` on `reference.pooled_selection.pooled_block_logits` computes them (the
PyTorch twin), without the masked logits, the probabilities or the int64 sort keys in memory.
Same arithmetic: logits rounded to the scores' dtype after scaling, probabilities rounded to it
before the top-k (so ties are the twin's ties), ties to the lowest block index.

Dimension legend: R rows = B x H x TC (TC queries of the chunk), NB scored blocks, K chosen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_core.kernels import outputs

ROW_ELEMENTS = 4096  # rows x padded blocks held by one program
MAX_BLOCKS = 4 * ROW_ELEMENTS  # one row of this many blocks per program is the most it holds


@triton.jit
def block_topk_kernel(
    SCORES, INDICES, PROBS, VALID,
    R, NB, TC, first_pos, scale, threshold,
    stride_sr, stride_ir,
    K: tl.constexpr, SEL: tl.constexpr, CAUSAL: tl.constexpr, MASK_OWN: tl.constexpr, NULL_LOGIT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    blocks = tl.arange(0, BLOCK_NB)
    in_rows = rows < R
    pos = first_pos + rows % TC
    visible = in_rows[:, None] & (blocks < NB)[None, :]
    if CAUSAL:
        visible &= (blocks[None, :] + 1) * SEL <= pos[:, None]
    if MASK_OWN:
        visible &= blocks[None, :] != (pos // SEL)[:, None]
    score_dtype = SCORES.dtype.element_ty
    x = tl.load(SCORES + rows[:, None] * stride_sr + blocks[None, :], mask=visible, other=0.0)
    x = (x.to(tl.float32) * scale).to(score_dtype).to(tl.float32)
    x = tl.where(visible, x, float("-inf"))
    top = tl.maximum(tl.max(x, axis=1), NULL_LOGIT)
    e = tl.exp(x - top[:, None])
    total = tl.sum(e, axis=1) + tl.exp(NULL_LOGIT - top)
    p = (e / total[:, None]).to(score_dtype).to(tl.float32)
    p = tl.where((blocks < NB)[None, :], p, -1.0)  # padding is never chosen (K <= NB)
    out = rows * stride_ir
    for slot in tl.static_range(K):
        best = tl.max(p, axis=1)
        choice = tl.min(tl.where(p == best[:, None], blocks[None, :], BLOCK_NB), axis=1)
        tl.store(INDICES + out + slot, choice.to(tl.int64), mask=in_rows)
        tl.store(PROBS + out + slot, best.to(score_dtype), mask=in_rows)
        tl.store(VALID + out + slot, (best > threshold).to(tl.int8), mask=in_rows)
        p = tl.where(blocks[None, :] == choice[:, None], -2.0, p)


@torch.library.custom_op("nsa::block_topk", mutates_args=())
def _block_topk(scores: torch.Tensor, k: int, scale: float, first_pos: int, selection_block_size: int, causal: bool,
                mask_own: bool, null_logit: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    TC, NB = scores.shape[-2], scores.shape[-1]
    flat = scores.contiguous().reshape(-1, NB)
    R = flat.shape[0]
    indices = outputs.new_output(R, k, device=scores.device, dtype=torch.int64)
    probs = outputs.new_output(R, k, device=scores.device, dtype=scores.dtype)
    valid = outputs.new_output(R, k, device=scores.device, dtype=torch.int8)
    block_nb = triton.next_power_of_2(NB)
    block_r = max(1, ROW_ELEMENTS // block_nb)
    if R > 0:
        block_topk_kernel[(triton.cdiv(R, block_r),)](
            flat, indices, probs, valid, R, NB, TC, first_pos, scale, threshold, flat.stride(0), indices.stride(0),
            K=k, SEL=selection_block_size, CAUSAL=causal, MASK_OWN=mask_own, NULL_LOGIT=null_logit,
            BLOCK_R=block_r, BLOCK_NB=block_nb, num_warps=8 if block_nb * block_r >= 8192 else 4,
        )
    shape = (*scores.shape[:-1], k)
    return indices.view(shape), valid.view(shape), probs.view(shape)


@_block_topk.register_fake
def _block_topk_fake(scores, k, scale, first_pos, selection_block_size, causal, mask_own, null_logit, threshold):
    shape = (*scores.shape[:-1], k)
    return (scores.new_empty(shape, dtype=torch.int64), scores.new_empty(shape, dtype=torch.int8),
            scores.new_empty(shape))


def block_topk(scores: torch.Tensor, k: int, *, scale: float, first_pos: int, selection_block_size: int, causal: bool,
               mask_own: bool, null_logit: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores (B, H, TC, NB) for queries first_pos ... first_pos + TC - 1 -> indices (B, H, TC, k)
    int64, valid (bool), probs (scores' dtype). 1 <= k <= NB. `null_logit` is the logit of the null
    slot in front of the blocks; a slot is valid when its probability exceeds `threshold` (given in
    the scores' dtype, as the twin compares). Not differentiable (use_diff_topk takes the twin)."""
    threshold = float(torch.tensor(threshold, dtype=scores.dtype))  # a Python float: no device read
    indices, valid, probs = _block_topk(scores, int(k), float(scale), int(first_pos), int(selection_block_size),
                                        bool(causal), bool(mask_own), float(null_logit), threshold)
    return indices, valid.view(torch.bool), probs
