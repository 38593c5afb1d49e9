"""The block selection of a decoding step's queries, as the parallel pass makes it (reference/selection.py),
from the keys a decoding cache holds and per-row query positions: pooled scores when selection blocks
are a multiple of the stride (nsa_core/selection.py's pooled_scoring), else the exact compressed logits
brought to block resolution. Causal (a cache serves causal modules only). With the compressed
attention over the cache's pages (step_compressed_selection_reference) it is the twin of the fused
step kernel (kernels/decode/compressed_selection.py).

Dimension legend: B batch, HQ query heads, HKV kv heads, K queries per sequence, NB selection blocks in
the cache's capacity, C compressed tokens in the capacity, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.reference.compressed_attention import compressed_scores
from nsa_core.reference.pooled_selection import mask_block_logits
from nsa_core.reference.selection import block_importance, select_top_blocks
from nsa_core.selection import Selection, SelectionRule


def select_step_blocks_reference(q: Tensor, keys: Tensor, rule: SelectionRule, positions: Tensor) -> Selection | None:
    """q (B, HQ, K, D) at positions (B, K); keys: the pooled keys (B, HKV, NB, D) when rule.pooled, else
    the compressed keys (B, HKV, C, D) without memory tokens -> the Selection of every query, or None."""
    B, H, K, D = q.shape
    if rule.pooled:
        if rule.share_across_group:
            q_sel = q.view(B, keys.shape[1], rule.group_size, K, D).mean(dim=2)
        else:
            q_sel, keys = q, keys.repeat_interleave(rule.group_size, dim=1)
        logits = mask_block_logits(torch.matmul(q_sel, keys.transpose(-1, -2)) * rule.scale, query_pos=positions,
                                   stride=rule.stride, selection_block_size=rule.selection_block_size, causal=True)
    else:
        scores = compressed_scores(q, keys, rule.stride, True, rule.scale, positions)
        logits = block_importance(scores, group_size=rule.group_size, share_across_group=rule.share_across_group,
                                  stride=rule.stride, selection_block_size=rule.selection_block_size,
                                  interpolated=rule.interpolated, causal=True, query_pos=positions,
                                  importance=rule.importance, compress_block=rule.compress_block)
    return select_top_blocks(logits, rule.num_selected, use_diff_topk=False, forced=rule.forced(positions))


def paged_slots(pool: Tensor, table: Tensor, slots: Tensor) -> Tensor:
    """pool (P, HKV, PAGE, D) behind table (B, pages per row): the entries at logical slots (B, N) ->
    (B, HKV, N, D)."""
    page = pool.shape[2]
    physical = table.long().gather(1, slots // page)
    return pool[physical, :, slots % page].transpose(1, 2)


def step_compressed_selection_reference(q: Tensor, ck_pool: Tensor, cv_pool: Tensor, table: Tensor, positions: Tensor,
                                        rule: SelectionRule, *, num_memory: int, num_compressed: int, scale: float,
                                        selection_keys: Tensor | None = None) -> tuple[Tensor, Selection | None]:
    """The twin of the fused step kernel (kernels/decode/compressed_selection.py): a decoding step's
    compressed attention and block selection, causal. q (B, HQ, K, D) at positions (B, K); the
    compressed slots (memory tokens first, compressed block c at slot M + c) in pages ck_pool /
    cv_pool (P, HKV, PAGE, D) behind table (B, pages per row); num_compressed: C, the compressed
    blocks of the capacity the selection scores. selection_keys: what
    select_step_blocks_reference scores (the cache's pooled keys when rule.pooled), None: read from
    the pages (pooled here when rule.pooled). -> (out (B, HQ, K, Dv), Selection or None).

    The kernel scores blocks from its attention's own logits in float32 (the mean of the logits,
    or the summed probabilities); this twin from the keys in the inputs' dtype (pooled keys when
    rule.pooled: the same mean, rounded otherwise), both rounding the block logits and the
    probabilities to the inputs' dtype and breaking ties to the lowest block index: the two pick
    the same blocks where no two blocks' scores are within rounding of each other at the k-th place."""
    B, HQ, K, _ = q.shape
    hi = num_memory + positions // rule.stride - 1  # (B, K): the last visible slot
    slots = torch.arange(num_memory + num_compressed, device=q.device).expand(B, -1)
    keys, values = paged_slots(ck_pool, table, slots), paged_slots(cv_pool, table, slots)  # (B, HKV, M + C, D)
    HKV = keys.shape[1]
    logits = torch.matmul(q.view(B, HKV, HQ // HKV, K, -1), keys[:, :, None].transpose(-1, -2)) * scale
    visible = torch.arange(slots.shape[1], device=q.device) <= hi[:, None, None, :, None]
    weights = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)  # the memory tokens are always visible
    out = torch.matmul(weights, values[:, :, None]).reshape(B, HQ, K, values.shape[-1])
    if selection_keys is None:
        selection_keys = keys[:, :, num_memory:]
        if rule.pooled:
            ratio = rule.selection_block_size // rule.stride
            nb = num_compressed // ratio
            selection_keys = selection_keys[:, :, : nb * ratio].unflatten(2, (nb, ratio)).mean(dim=3)
    return out, select_step_blocks_reference(q, selection_keys, rule, positions)
