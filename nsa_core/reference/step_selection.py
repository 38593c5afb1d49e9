"""The block selection of a decoding step's queries, as the parallel pass makes it (reference/selection.py),
from the keys a decoding cache holds and per-row query positions: pooled scores when selection blocks
are a multiple of the stride (nsa_core/selection.py's pooled_scoring), else the exact compressed logits
brought to block resolution. Causal (a cache serves causal modules only).

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
