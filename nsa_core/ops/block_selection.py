"""select_blocks: from the queries and the compressed keys to the top-n key blocks of each query
(validation + dispatch). The rule is reference/selection.py's.

Kernel path, for selection blocks a multiple of the stride: block scores pooled before the dot
product (reference/pooled_selection.py) and, without use_diff_topk (whose gates need the softmax's
gradient), mask + softmax + top-k as one Triton pass (kernels/block_topk.py); with it, PyTorch's
softmax and top-k on the pooled logits. Over query chunks either way (memory linear in T).
Reference: reference/selection.py (exact compressed logits, any selection block); selection blocks
smaller than the stride take it by design.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops.dispatch import use_kernels
from nsa_core.ops.seqs import Seqs, query_seqs
from nsa_core.ops.validation import check_same_device_dtype
from nsa_core.reference.masked_softmax import map_query_chunks, query_chunk_size
from nsa_core.reference.pooled_selection import pooled_block_logits, pooled_block_scores
from nsa_core.reference.selection import (
    NULL_SLOT_LOGIT,
    VALID_THRESHOLD,
    Selection,
    SelectionRule,
    join_selection,
    num_scored_blocks,
    select_blocks_reference,
    select_top_blocks,
    selection_fields,
)


def select_blocks(q: Tensor, ck: Tensor, rule: SelectionRule, *, seqs: Seqs | None = None,
                  backend: str = "auto") -> Selection | None:
    """q (B, HQ, T, D), compressed keys ck (B, HKV, C, D) without memory tokens -> Selection with
    indices / valid / probs (B, H, T, S) (H = HKV when the group shares its selection, else HQ),
    gates with use_diff_topk; None when no block can be selected."""
    check_same_device_dtype(q=q, ck=ck)
    if not isinstance(rule, SelectionRule):
        raise TypeError(f"rule must be a SelectionRule, got {type(rule).__name__}")
    seqs = query_seqs(q, seqs)
    pooled = rule.selection_block_size % rule.stride == 0
    by_design = None if pooled else "selection blocks smaller than the stride are scored on the exact reference path"

    def unsupported() -> str | None:
        from nsa_core.kernels.limits import dtype_reason

        return dtype_reason(q)

    if not use_kernels(backend, q.device, "block_selection", unsupported, by_design=by_design):
        return select_blocks_reference(q, ck, rule, q_offset=seqs.q_offset)
    return _select_pooled(q, ck, rule, seqs)


def _select_pooled(q: Tensor, ck: Tensor, rule: SelectionRule, seqs: Seqs) -> Selection | None:
    B, HQ, T, _ = q.shape
    num_blocks = num_scored_blocks(ck.shape[-2], rule.stride, rule.selection_block_size)
    k = min(rule.num_selected, num_blocks)
    if k == 0:
        return None
    heads = ck.shape[1] if rule.share_across_group else HQ
    chunk = query_chunk_size(T, max(1, ck.shape[-2]), heads, B, budget=1 << 27)
    needs_grad = rule.use_diff_topk and torch.is_grad_enabled() and (q.requires_grad or ck.requires_grad)
    pooling = dict(group_size=rule.group_size, share_across_group=rule.share_across_group, stride=rule.stride,
                   selection_block_size=rule.selection_block_size)
    from nsa_core.kernels.block_topk import MAX_BLOCKS
    from nsa_core.kernels.limits import dtype_reason

    if not rule.use_diff_topk and num_blocks <= MAX_BLOCKS and dtype_reason(q) is None:
        from nsa_core.kernels.block_topk import block_topk

        def part(start: int, end: int) -> tuple:
            scores = pooled_block_scores(q[:, :, start:end], ck, **pooling)
            indices, valid, probs = block_topk(
                scores, k, scale=rule.scale, first_pos=seqs.q_offset + start, causal=rule.causal,
                selection_block_size=rule.selection_block_size, mask_own=rule.selection_block_size != rule.stride,
                null_logit=NULL_SLOT_LOGIT, threshold=VALID_THRESHOLD,
            )
            return indices, valid, probs, None
    else:
        def part(start: int, end: int) -> tuple:
            pos = torch.arange(seqs.q_offset + start, seqs.q_offset + end, device=q.device)
            logits = pooled_block_logits(q[:, :, start:end], ck, causal=rule.causal, scale=rule.scale, query_pos=pos,
                                         **pooling)
            return selection_fields(select_top_blocks(logits, rule.num_selected, rule.use_diff_topk))

    with torch.set_grad_enabled(needs_grad):
        return join_selection(*map_query_chunks(part, T, chunk, needs_grad))
