"""Block scores pooled before the dot product: the selection's fast scoring and the PyTorch twin of
the block top-k kernel (kernels/block_topk.py).

The mean over a group's query heads of q . ck, pooled over the r = selection / stride compressed
blocks of a selection block, is (mean of the group's q) . (mean of the r compressed keys):
(T x T/selection) scores per kv head instead of (T x T/stride) per query head. Equal to
`reference.selection` up to rounding (a near-tie may then pick another block).

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, T queries, C compressed
blocks, NB selection blocks that can be scored, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.reference.compressed_attention import masked_score, position_column


def pooled_keys(ck: Tensor, ratio: int) -> Tensor:
    """ck (B, HKV, C, D) -> (B, HKV, C // ratio, D): the mean of every `ratio` consecutive compressed
    keys (an incomplete trailing group dropped)."""
    B, HKV, C, D = ck.shape
    nb = C // ratio
    return ck[:, :, : nb * ratio].view(B, HKV, nb, ratio, D).mean(dim=3)


def block_scores(q: Tensor, keys: Tensor, *, group_size: int, share_across_group: bool) -> Tensor:
    """Unscaled scores (B, H, T, NB) of q (B, HQ, T, D) against pooled keys (B, HKV, NB, D): the
    group's mean query when the group shares its selection, else every query head."""
    B, _, T, D = q.shape
    HKV = keys.shape[1]
    if share_across_group:
        q = q.view(B, HKV, group_size, T, D).mean(dim=2)
    else:
        keys = keys.repeat_interleave(group_size, dim=1)
    return torch.matmul(q, keys.transpose(-1, -2))


def pooled_block_scores(q: Tensor, ck: Tensor, *, group_size: int, share_across_group: bool, stride: int,
                        selection_block_size: int) -> Tensor:
    """Unscaled, unmasked block scores (B, H, T, NB): (mean of the group's q) . (mean of the
    r = selection / stride compressed keys of each block). q (B, HQ, T, D), ck (B, HKV, C, D)."""
    keys = pooled_keys(ck, selection_block_size // stride)
    return block_scores(q, keys, group_size=group_size, share_across_group=share_across_group)


def mask_block_logits(logits: Tensor, *, query_pos: Tensor, stride: int, selection_block_size: int,
                      causal: bool) -> Tensor:
    """Causal: blocks not wholly before the query get the masked score; selection blocks larger
    than the stride: the own block gets -finfo.max (as selection.block_importance)."""
    blocks = torch.arange(logits.shape[-1], device=logits.device)
    if causal:
        visible = (blocks + 1) * selection_block_size <= position_column(query_pos)
        logits = logits.masked_fill(~visible, masked_score(logits.dtype))
    if selection_block_size != stride:
        own = position_column(query_pos // selection_block_size) == blocks
        logits = logits.masked_fill(own, -torch.finfo(logits.dtype).max)
    return logits


def pooled_block_logits(
    q: Tensor, ck: Tensor, *, group_size: int, share_across_group: bool, stride: int, selection_block_size: int,
    causal: bool, scale: float, query_pos: Tensor,
) -> Tensor:
    """Block logits before the softmax, as selection.block_importance computes them, for
    selection blocks that are a multiple of the stride. q (B, HQ, T, D), ck (B, HKV, C, D)."""
    scores = pooled_block_scores(q, ck, group_size=group_size, share_across_group=share_across_group, stride=stride,
                                 selection_block_size=selection_block_size)
    return mask_block_logits(scores * scale, query_pos=query_pos, stride=stride,
                             selection_block_size=selection_block_size, causal=causal)
