"""select_blocks' kernel path for packed documents: every document scored in one pass over the
packed row (no loop over documents, no host read), equal to selecting each document alone.

The documents' selection blocks are pooled into one row of slots (reference/packed_selection.py);
each chunk of queries is scored against all of them (one matmul, as a plain row of T tokens) and
the Triton block top-k reads each query's own document's window (kernels/block_topk.py,
block_topk_packed). use_diff_topk (whose gates need the softmax's gradient), dtypes the kernels do
not take and documents of more than MAX_BLOCKS blocks take the PyTorch twin on the same layout.
Selection blocks smaller than the stride are not pooled: select_blocks runs them, and the
reference backend, one document at a time (block_selection._select_per_document).

Dimension legend: B batch (1), HQ query heads, H heads of the selection, T tokens, C = T // stride
compressed slots, S = packed_slots slots per query, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops.seqs import Seqs
from nsa_core.reference.masked_softmax import map_query_chunks, query_chunk_size
from nsa_core.reference.packed_selection import (
    packed_block_logits,
    packed_blocks,
    packed_pooled_keys,
    select_packed_blocks,
)
from nsa_core.reference.pooled_selection import block_scores
from nsa_core.reference.selection import (
    NULL_SLOT_LOGIT,
    VALID_THRESHOLD,
    Selection,
    SelectionRule,
    num_scored_blocks,
)


def packed_slots(rule: SelectionRule, total: int) -> int:
    """Slots per query of a packed selection: min(num_selected, blocks of a document of `total` tokens)."""
    return min(rule.num_selected, num_scored_blocks(total // rule.stride, rule.stride, rule.selection_block_size))


def select_packed(q: Tensor, ck: Tensor, rule: SelectionRule, seqs: Seqs) -> Selection | None:
    """q (1, HQ, T, D), ck (1, HKV, C, D) of packed documents (selection blocks a multiple of the
    stride) -> Selection (1, H, T, S), indices numbered from each document's start; None when S = 0."""
    B, HQ, T, _ = q.shape
    S = packed_slots(rule, T)
    if S == 0:
        return None
    longest = T if seqs.max_seqlen is None else seqs.max_seqlen  # a descriptor made by hand may lack it
    blocks = packed_blocks(seqs.cu_seqlens, T, longest, rule.stride, rule.selection_block_size)
    heads = ck.shape[1] if rule.share_across_group else HQ
    chunk = query_chunk_size(T, max(1, ck.shape[-2]), heads, B, budget=1 << 27)
    needs_grad = rule.use_diff_topk and torch.is_grad_enabled() and (q.requires_grad or ck.requires_grad)
    with torch.set_grad_enabled(needs_grad):
        keys = packed_pooled_keys(ck, blocks)  # (B, HKV, P, D), pooled once for every chunk
    grouping = dict(group_size=rule.group_size, share_across_group=rule.share_across_group)
    from nsa_core.kernels.block_topk import MAX_BLOCKS
    from nsa_core.kernels.limits import dtype_reason

    if not rule.use_diff_topk and blocks.width <= MAX_BLOCKS and dtype_reason(q) is None:
        from nsa_core.kernels.block_topk import block_topk_packed

        def part(start: int, end: int) -> tuple:
            scores = block_scores(q[:, :, start:end], keys, **grouping)
            indices, valid, probs = block_topk_packed(
                scores, S, positions=blocks.positions[start:end], first_slot=blocks.first_slot[start:end],
                num_blocks=blocks.num_blocks[start:end], width=blocks.width, scale=rule.scale,
                selection_block_size=rule.selection_block_size, causal=rule.causal,
                mask_own=rule.selection_block_size != rule.stride, null_logit=NULL_SLOT_LOGIT, threshold=VALID_THRESHOLD,
            )
            return indices, valid, probs, None
    else:
        def part(start: int, end: int) -> tuple:
            scores = block_scores(q[:, :, start:end], keys, **grouping)
            logits = packed_block_logits(scores, blocks, start, end, scale=rule.scale, stride=rule.stride,
                                         selection_block_size=rule.selection_block_size, causal=rule.causal)
            return select_packed_blocks(logits, blocks.num_blocks[start:end], S, rule.use_diff_topk)

    with torch.set_grad_enabled(needs_grad):
        return Selection(*map_query_chunks(part, T, chunk, needs_grad))
