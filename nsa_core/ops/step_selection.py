"""The block selection of a decoding step's queries over a cache's keys (validation;
reference/step_selection.py computes it). select_blocks calls it for a decoding-step descriptor
(`Seqs.step`). PyTorch only, whatever the backend: a module's step does not come here but through
ops/compressed_selection.py, whose fused kernel scores and picks the blocks with the compressed
branch, or from the cache's block keys with importance "selected_keys" (this selection is its twin's).

Dimension legend: B batch, HQ query heads, HKV kv heads, K queries per sequence, D head dim,
NB selection blocks in the cache's capacity, C compressed tokens in it.
"""

from __future__ import annotations

from torch import Tensor

from nsa_core.ops.paged import PooledBlockKeys
from nsa_core.ops.validation import check_same_device_dtype
from nsa_core.reference.step_selection import select_step_blocks_reference
from nsa_core.selection import Selection, SelectionRule
from nsa_core.seqs import Seqs, check_rows


def select_step_blocks(q: Tensor, ck: Tensor | PooledBlockKeys, rule: SelectionRule, seqs: Seqs) -> Selection | None:
    """q (B, HQ, K, D) of a decoding step (`seqs` from Seqs.step); ck: the cache's pooled block keys
    (PooledBlockKeys, (B, HKV, NB, D)) when rule.pooled, else its compressed keys without memory
    tokens (B, HKV, C, D) -> Selection (B, H, K, S), or None when no block can be selected."""
    if rule.pooled != isinstance(ck, PooledBlockKeys):
        want = "PooledBlockKeys (the cache's pooled block keys)" if rule.pooled else "a tensor of compressed keys"
        raise TypeError(f"a decoding step's selection with this rule scores {want}: ck must be that, got "
                        f"{type(ck).__name__}")
    keys = ck.keys if rule.pooled else ck
    check_same_device_dtype(q=q, ck=keys)
    B, _, K, D = q.shape
    if keys.shape[0] != B or keys.shape[-1] != D:
        raise ValueError(f"ck must be (B={B}, HKV, N, D={D}), got {tuple(keys.shape)}")
    if K != seqs.q_len:
        raise ValueError(f"seqs describes {seqs.q_len} queries per row, got q with {K} tokens")
    check_rows(seqs, q)
    positions = seqs.query_positions(q.device)
    return select_step_blocks_reference(q, keys, rule, positions)
