"""select_step_blocks: the block selection of a decoding step's queries over a cache's keys
(validation; reference/step_selection.py computes it). PyTorch only, whatever the backend: a step's
scoring is one small matmul per layer, captured with the rest of the step in a CUDA graph.

Dimension legend: B batch, HQ query heads, HKV kv heads, K queries per sequence, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops.validation import check_same_device_dtype
from nsa_core.reference.step_selection import select_step_blocks_reference
from nsa_core.selection import Selection, SelectionRule


def select_step_blocks(q: Tensor, keys: Tensor, rule: SelectionRule, positions: Tensor) -> Selection | None:
    """q (B, HQ, K, D) at positions (B, K) int64; keys (B, HKV, N, D): the cache's pooled keys when
    rule.pooled, else its compressed keys without memory tokens -> Selection (B, H, K, S), or None
    when no block can be selected."""
    if not isinstance(rule, SelectionRule):
        raise TypeError(f"rule must be a SelectionRule, got {type(rule).__name__}")
    check_same_device_dtype(q=q, keys=keys)
    B, _, K, D = q.shape
    if keys.ndim != 4 or keys.shape[0] != B or keys.shape[-1] != D:
        raise ValueError(f"keys must be (B={B}, HKV, N, D={D}), got {tuple(keys.shape)}")
    if positions.shape != (B, K) or positions.dtype != torch.int64:
        raise ValueError(f"positions must be an int64 tensor (B={B}, K={K}), got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    return select_step_blocks_reference(q, keys, rule, positions)
