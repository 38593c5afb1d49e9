"""Launch and torch.library registration of the fused compressed-branch kernel
(kernels/compressed_scoring.py): outputs, tiles, grid, and the autograd of its output.

The kernel is forward only. Its output's backward is the compressed branch's backward of today:
the staircase SDPA of kernels/compressed_sdpa.py, re-run on the saved inputs under autograd
(its forward once more, then its flash / cuDNN backward), so the gradients are that path's. The
log-sum-exp and the scores carry no gradient.

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, T queries, M memory tokens,
C compressed blocks, NB = C // (selection / stride) selection blocks, H heads of the scores
(HKV when the group shares its selection, else HQ), D / Dv head dims.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from nsa_core.kernels import outputs
from nsa_core.kernels.compressed_scoring import compressed_scoring_kernel
from nsa_core.kernels.compressed_sdpa import compressed_attention_sdpa
from nsa_core.kernels.limits import dtype_reason, head_dim_reason

ROWS = 64  # query rows (queries x padded heads of a group) per program; not tuned on a GPU
BLOCK_C = 64  # compressed blocks per key tile


def overlap_extra(summed: bool, compress_block: int, stride: int) -> int:
    """E: compressed blocks a selection block overlaps beyond its r = selection / stride (summed_probs:
    the windows reaching into it from the right, reference/selection.overlapping_compressed_blocks)."""
    return (compress_block + stride - 1) // stride - 1 if summed else 0


def scoring_unsupported_reason(q: Tensor, ck_all: Tensor, cv_all: Tensor, *, stride: int, selection_block_size: int,
                               compress_block: int, summed: bool) -> str | None:
    """Why the fused kernel cannot take these inputs, or None."""
    reason = dtype_reason(q) or head_dim_reason(q.shape[-1], cv_all.shape[-1])
    if reason is not None:
        return reason
    if selection_block_size % stride:
        return (f"the fused kernel scores selection blocks a multiple of the stride, got {selection_block_size} "
                f"and {stride}")
    r = selection_block_size // stride
    if r + overlap_extra(summed, compress_block, stride) > BLOCK_C:
        return f"a selection block overlaps more than {BLOCK_C} compressed blocks"
    o = torch.empty((*q.shape[:-1], cv_all.shape[-1]), device="meta")
    return outputs.too_large_reason(q=q, ck=ck_all, cv=cv_all, output=o)


def _launch(q: Tensor, ck_all: Tensor, cv_all: Tensor, num_memory: int, stride: int, selection_block_size: int,
            compress_block: int, causal: bool, scale: float, q_offset: int, summed: bool, share: bool,
            mask_own: bool) -> tuple[Tensor, Tensor, Tensor]:
    q, ck_all, cv_all = (t.contiguous() for t in (q, ck_all, cv_all))
    B, HQ, T, D = q.shape
    HKV, DV = ck_all.shape[1], cv_all.shape[-1]
    G, C = HQ // HKV, ck_all.shape[2] - num_memory
    r = selection_block_size // stride
    NB = C // r
    o = outputs.new_output(B, HQ, T, DV, device=q.device, dtype=q.dtype)
    lse = outputs.new_output(B, HQ, T, device=q.device, dtype=torch.float32)
    scores = outputs.new_output(B, HKV if share else HQ, T, NB, device=q.device, dtype=q.dtype)
    gp = triton.next_power_of_2(G)
    block_t = max(1, ROWS // gp)
    rows = max(16, block_t * gp)
    block_t = rows // gp
    J = (BLOCK_C - overlap_extra(summed, compress_block, stride)) // r
    num_t = triton.cdiv(T, block_t)
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # the interpreter (compressed_scoring._tile)
    if T > 0 and B * HKV > 0:
        compressed_scoring_kernel[(num_t * B * HKV,)](
            q, ck_all, cv_all, o, lse, scores, *q.stride()[:3], *ck_all.stride()[:3], *cv_all.stride()[:3],
            *o.stride()[:3], T, C, NB, q_offset, HQ, G, num_t, scale,
            M=num_memory, STRIDE=stride, SEL=selection_block_size, CMP=compress_block, J=J, CAUSAL=causal,
            MASK_OWN=mask_own, SUMMED=summed, SHARE=share, D=D, DV=DV,
            BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
            BLOCK_M=max(16, triton.next_power_of_2(num_memory)), BLOCK_T=block_t, GP=gp, BLOCK_C=BLOCK_C,
            BLOCK_J=max(16, triton.next_power_of_2(J)), UPCAST=upcast, num_warps=4,
            PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        )
    return o, lse, scores


@torch.library.custom_op("nsa::compressed_scoring", mutates_args=())
def _fwd(q: Tensor, ck_all: Tensor, cv_all: Tensor, num_memory: int, stride: int, selection_block_size: int,
         compress_block: int, causal: bool, scale: float, q_offset: int, summed: bool, share: bool,
         mask_own: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _launch(q, ck_all, cv_all, num_memory, stride, selection_block_size, compress_block, causal, scale,
                   q_offset, summed, share, mask_own)


@_fwd.register_fake
def _fwd_fake(q, ck_all, cv_all, num_memory, stride, selection_block_size, compress_block, causal, scale, q_offset,
              summed, share, mask_own):
    B, HQ, T, _ = q.shape
    NB = (ck_all.shape[2] - num_memory) // (selection_block_size // stride)
    return (q.new_empty(B, HQ, T, cv_all.shape[-1]), q.new_empty(B, HQ, T, dtype=torch.float32),
            q.new_empty(B, ck_all.shape[1] if share else HQ, T, NB))


def _setup_context(ctx, inputs, output):
    q, ck_all, cv_all, num_memory, stride, _, _, causal, scale, q_offset, _, _, _ = inputs
    ctx.save_for_backward(q, ck_all, cv_all)
    ctx.args = (num_memory, stride, causal, scale, q_offset)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, do, dlse, dscores):
    q, ck_all, cv_all = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(need) for t, need in zip((q, ck_all, cv_all), ctx.needs_input_grad)]
        out = compressed_attention_sdpa(*inputs, *ctx.args)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, do) if wanted else ())
    dq, dk, dv = (next(grads) if t.requires_grad else None for t in inputs)
    return dq, dk, dv, *([None] * 10)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def compressed_scoring(q: Tensor, ck_all: Tensor, cv_all: Tensor, *, num_memory: int, stride: int,
                       selection_block_size: int, compress_block: int, causal: bool, scale: float, q_offset: int = 0,
                       summed: bool = False, share: bool = True, mask_own: bool = True
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, HQ, T, D) at positions q_offset ..., ck_all / cv_all (B, HKV, M + C, D / Dv) memory first
    -> (out (B, HQ, T, Dv), lse (B, HQ, T) float32, scores (B, H, T, NB) in q's dtype).

    out: compressed attention (causal: block c visible to the query at p when (c + 1) * stride <= p;
    memory tokens always), differentiable (the backward of kernels/compressed_sdpa.py). scores: per
    query and selection block (selection_block_size a multiple of the stride), the mean over the
    group's heads (share) and the block's compressed blocks of q . k, unscaled (summed=False: what
    reference/pooled_selection.pooled_block_scores gives), or the log of the compressed attention's
    probabilities (softmax over the visible compressed blocks, memory left out) summed over the
    compressed blocks overlapping the block (windows of compress_block tokens) and the group's heads
    (summed=True: reference/selection.block_importance's logits). -inf where the query may not select
    the block (causal: not wholly before it; mask_own: its own block). For kernels/block_topk.py
    (scale=scale for the mean of logits, 1 for the summed probabilities)."""
    return _fwd(q, ck_all, cv_all, int(num_memory), int(stride), int(selection_block_size), int(compress_block),
                bool(causal), float(scale), int(q_offset), bool(summed), bool(share), bool(mask_own))
