"""select_blocks: from the queries and the compressed keys to the top-n key blocks of each query
(validation + dispatch). The rule is reference/selection.py's.

Kernel path, for selection blocks a multiple of the stride: block scores pooled before the dot
product (reference/pooled_selection.py) and mask + softmax + top-k (forced blocks first, counted
from each packed document's start) as one Triton pass (kernels/block_topk.py); by design, with
use_diff_topk (whose gates need the softmax's gradient), PyTorch's softmax and top-k on the pooled
logits. Whether the Triton top-k runs is dispatch.py's rule like every kernel
(_topk_kernel): more blocks than it holds raise with backend="triton" and fall back, with a
warning, with "auto". Over query chunks either way (memory linear in T).
PyTorch: when blocks are scored pooled (selection blocks a multiple of the stride, mean-logit
importance), reference/fast_selection.py (the same pooled scores over each query chunk's visible
blocks, one softmax and a float top-k); else reference/selection.py (exact compressed logits, any
selection block, either importance score), which is also the twin both are tested against.
Selection blocks smaller than the stride and the summed-probability score take it by design.

Packed documents (`seqs.cu_seqlens`): ck holds T // stride slots (document i's compressed token j at
slot cu_seqlens[i] // stride + j); blocks are numbered from each document's start; every query gets
S = min(num_selected, blocks of the longest possible document) slots, those its document lacks
(it has fewer blocks) marked with index -1, invalid, probability 0. The kernel path scores all
documents in one pass (_select_packed): their selection blocks pooled into one row of slots
(reference/packed_selection.py), each chunk of queries scored against all of them (one matmul, as
a plain row of T tokens), and the Triton top-k reading each query's own document's window
(block_topk_packed), or the PyTorch twin on the same layout where a plain row takes it. The
PyTorch side (each document as a plain row takes it) and selection blocks smaller than the stride
(by design) select each document alone (_select_per_document; on the reference it is the twin;
it reads the document bounds on the host).

A decoding step (`Seqs.step`): the queries score the cache's keys (ck: its pooled block keys,
PooledBlockKeys, or its compressed keys) at their device-side positions (ops/step_selection.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops import dispatch
from nsa_core.ops.dispatch import use_kernels
from nsa_core.ops.paged import PooledBlockKeys
from nsa_core.ops.step_selection import select_step_blocks
from nsa_core.seqs import Seqs, query_seqs
from nsa_core.ops.validation import check_same_device_dtype
from nsa_core.reference.documents import compressed_span, per_document
from nsa_core.reference.fast_selection import select_blocks_fast
from nsa_core.reference.masked_softmax import map_query_chunks, query_chunk_size
from nsa_core.reference.packed_selection import (
    packed_block_logits,
    packed_blocks,
    packed_pooled_keys,
    select_packed_blocks,
)
from nsa_core.reference.pooled_selection import block_scores, pooled_block_logits, pooled_block_scores
from nsa_core.reference.selection import (
    NULL_SLOT_LOGIT,
    VALID_THRESHOLD,
    num_scored_blocks,
    select_blocks_reference,
    select_top_blocks,
    selection_fields,
)
from nsa_core.selection import Selection, SelectionRule


def select_blocks(q: Tensor, ck: Tensor | PooledBlockKeys, rule: SelectionRule, *, seqs: Seqs | None = None,
                  backend: str = "auto") -> Selection | None:
    """q (B, HQ, T, D), compressed keys ck (B, HKV, C, D) without memory tokens -> Selection with
    indices / valid / probs (B, H, T, S) (H = HKV when the group shares its selection, else HQ),
    gates with use_diff_topk; None when no block can be selected. A decoding step (`seqs` from
    Seqs.step): ck is the cache's selection keys (select_step_blocks), no gates.
    With importance "selected_keys", q are the rotated queries and ck the selected branch's block keys
    (B, HKV, NB, D), one per selection block (model/selection_keys.py; packed documents: in T // block
    slots, as compressed keys at a stride of one block), scored by the rule's block_key_rule."""
    if not isinstance(rule, SelectionRule):
        raise TypeError(f"rule must be a SelectionRule, got {type(rule).__name__}")
    rule = rule.block_key_rule()
    if isinstance(seqs, Seqs) and seqs.is_step:
        return select_step_blocks(q, ck, rule, seqs)
    if isinstance(ck, PooledBlockKeys):
        raise TypeError("ck as PooledBlockKeys (a cache's pooled block keys) needs a decoding-step seqs (Seqs.step)")
    check_same_device_dtype(q=q, ck=ck)
    seqs = query_seqs(q, seqs)
    by_design = None
    if rule.importance == "summed_probs":
        by_design = "the summed-probability importance score is computed on the exact reference path"
    elif not rule.pooled:
        by_design = "selection blocks smaller than the stride are scored on the exact reference path"
    if seqs.is_packed and ck.shape[-2] != q.shape[-2] // rule.stride:
        raise ValueError(f"packed documents need ck with T // stride = {q.shape[-2] // rule.stride} slots, "
                         f"got {ck.shape[-2]}")

    def unsupported() -> str | None:
        from nsa_core.kernels.limits import dtype_reason

        return dtype_reason(q)

    if not use_kernels(backend, q.device, "block_selection", unsupported, by_design=by_design):
        torch_select = select_blocks_fast if rule.pooled else select_blocks_reference
        if seqs.is_packed:
            return _select_per_document(q, ck, rule, seqs, select=torch_select)
        return torch_select(q, ck, rule, q_offset=seqs.q_offset)
    if seqs.is_packed:
        return _select_packed(q, ck, rule, seqs, backend)
    return _select_pooled(q, ck, rule, seqs, backend)


def _topk_kernel(rule: SelectionRule, num_blocks: int, backend: str, q: Tensor) -> bool:
    """Whether the kernel path's top-k runs in the Triton pass (dispatch.py's rule, asked of the
    top-k on its own: the scoring before it is the op's kernel path either way)."""
    by_design = None
    if rule.use_diff_topk:
        by_design = "use_diff_topk's gates need the softmax's gradient: PyTorch's top-k on the pooled logits"

    def unsupported() -> str | None:
        from nsa_core.kernels.block_topk import MAX_BLOCKS
        from nsa_core.kernels.limits import dtype_reason

        if num_blocks > MAX_BLOCKS:
            return f"the top-k kernel holds at most {MAX_BLOCKS} blocks per query, got {num_blocks}"
        return dtype_reason(q)

    return dispatch.use_kernels(backend, q.device, "block_selection top-k", unsupported, by_design=by_design)


def _select_pooled(q: Tensor, ck: Tensor, rule: SelectionRule, seqs: Seqs, backend: str = "auto") -> Selection | None:
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
    if _topk_kernel(rule, num_blocks, backend, q):
        from nsa_core.kernels.block_topk import block_topk

        def part(start: int, end: int) -> tuple:
            scores = pooled_block_scores(q[:, :, start:end], ck, **pooling)
            indices, valid, probs = block_topk(
                scores, k, scale=rule.scale, first_pos=seqs.q_offset + start, causal=rule.causal,
                selection_block_size=rule.selection_block_size, mask_own=rule.selection_block_size != rule.stride,
                null_logit=NULL_SLOT_LOGIT, threshold=VALID_THRESHOLD, forced_initial=rule.forced_initial,
                forced_local=rule.forced_local,
            )
            return indices, valid, probs, None
    else:
        def part(start: int, end: int) -> tuple:
            pos = torch.arange(seqs.q_offset + start, seqs.q_offset + end, device=q.device)
            logits = pooled_block_logits(q[:, :, start:end], ck, causal=rule.causal, scale=rule.scale, query_pos=pos,
                                         **pooling)
            return selection_fields(select_top_blocks(logits, rule.num_selected, rule.use_diff_topk,
                                                      forced=rule.forced(pos)))

    with torch.set_grad_enabled(needs_grad):
        return Selection(*map_query_chunks(part, T, chunk, needs_grad))


def packed_slots(rule: SelectionRule, total: int) -> int:
    """Slots per query of a packed selection: min(num_selected, blocks of a document of `total` tokens)."""
    return min(rule.num_selected, num_scored_blocks(total // rule.stride, rule.stride, rule.selection_block_size))


def _select_packed(q: Tensor, ck: Tensor, rule: SelectionRule, seqs: Seqs, backend: str = "auto") -> Selection | None:
    """q (1, HQ, T, D), ck (1, HKV, C, D) of packed documents (selection blocks a multiple of the
    stride) -> Selection (1, H, T, S), indices numbered from each document's start; None when S = 0."""
    B, HQ, T, _ = q.shape
    S = packed_slots(rule, T)
    if S == 0:
        return None
    longest = T if seqs.max_seqlen is None else seqs.max_seqlen  # a descriptor made by hand may lack it
    shape = (T, longest, rule.stride, rule.selection_block_size)
    blocks = seqs.layout(("packed_blocks", *shape), lambda: packed_blocks(seqs.cu_seqlens, *shape))
    heads = ck.shape[1] if rule.share_across_group else HQ
    chunk = query_chunk_size(T, max(1, ck.shape[-2]), heads, B, budget=1 << 27)
    needs_grad = rule.use_diff_topk and torch.is_grad_enabled() and (q.requires_grad or ck.requires_grad)
    with torch.set_grad_enabled(needs_grad):
        keys = packed_pooled_keys(ck, blocks)  # (B, HKV, P, D), pooled once for every chunk
    grouping = dict(group_size=rule.group_size, share_across_group=rule.share_across_group)
    if _topk_kernel(rule, blocks.width, backend, q):
        from nsa_core.kernels.block_topk import block_topk_packed

        def part(start: int, end: int) -> tuple:
            scores = block_scores(q[:, :, start:end], keys, **grouping)
            indices, valid, probs = block_topk_packed(
                scores, S, positions=blocks.positions[start:end], first_slot=blocks.first_slot[start:end],
                num_blocks=blocks.num_blocks[start:end], width=blocks.width, scale=rule.scale,
                selection_block_size=rule.selection_block_size, causal=rule.causal,
                mask_own=rule.selection_block_size != rule.stride, null_logit=NULL_SLOT_LOGIT,
                threshold=VALID_THRESHOLD, forced_initial=rule.forced_initial, forced_local=rule.forced_local,
            )
            return indices, valid, probs, None
    else:
        def part(start: int, end: int) -> tuple:
            scores = block_scores(q[:, :, start:end], keys, **grouping)
            logits = packed_block_logits(scores, blocks, start, end, scale=rule.scale, stride=rule.stride,
                                         selection_block_size=rule.selection_block_size, causal=rule.causal)
            return select_packed_blocks(logits, blocks.num_blocks[start:end], S, rule.use_diff_topk,
                                        forced=rule.forced(blocks.positions[start:end]))

    with torch.set_grad_enabled(needs_grad):
        return Selection(*map_query_chunks(part, T, chunk, needs_grad))


def _select_per_document(q: Tensor, ck: Tensor, rule: SelectionRule, seqs: Seqs,
                         select=select_blocks_reference) -> Selection | None:
    """The packed twin: every document's selection alone (`select`, the reference by default),
    slots it lacks marked -1 / invalid."""
    S = packed_slots(rule, q.shape[-2])
    if S == 0:
        return None
    heads = ck.shape[1] if rule.share_across_group else q.shape[1]

    def document(start: int, end: int) -> tuple:
        first, last = compressed_span(start, end, rule.stride)
        alone = select(q[:, :, start:end], ck[:, :, first:last], rule)
        shape = (q.shape[0], heads, end - start, S)
        fields = [torch.full(shape, -1, dtype=torch.long, device=q.device), torch.zeros(shape, dtype=torch.bool,
                  device=q.device), q.new_zeros(shape), q.new_zeros(shape) if rule.use_diff_topk else None]
        if alone is None:
            return tuple(fields)
        return tuple(None if pad is None else torch.cat((got, pad[..., got.shape[-1]:]), dim=-1)
                     for got, pad in zip(selection_fields(alone), fields))

    needs_grad = rule.use_diff_topk and torch.is_grad_enabled() and (q.requires_grad or ck.requires_grad)
    with torch.set_grad_enabled(needs_grad):
        return Selection(*per_document(document, seqs.spans()))
