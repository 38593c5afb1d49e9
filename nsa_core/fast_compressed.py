"""Faster equivalents of compressed attention and block scoring, used on the kernel path.

- Causal compressed attention is a causal attention in disguise: give query t the row
  floor(t / stride) + M - 1 (M memory tokens, M - 1 empty rows on top) with the memory tokens in
  front of the compressed keys; top-left causal masking then shows row j + M - 1 the M memory
  tokens and compressed blocks 0 .. j-1, exactly the blocks whose last token is before t. The
  stride tokens of a row go into the heads, so one flash SDPA call (GQA included) does the
  branch, forward and backward.
- Block scores: the mean over a group's query heads of q . ck, pooled over the r = selection /
  stride compressed blocks of a selection block, is (mean of the group's q) . (mean of the r
  compressed keys): (T x T/selection) scores per kv head instead of (T x T/stride) per query head.
  Equal to the PyTorch path up to rounding (a near-tie may then pick another block).

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, T queries, C compressed
blocks, NB selection blocks that can be scored, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_core.reference.compressed_attention import masked_score


def compressed_attention_sdpa(q: Tensor, ck_all: Tensor, cv_all: Tensor, num_memory: int, stride: int, causal: bool,
                              scale: float) -> Tensor:
    """q (B, HQ, T, D), ck_all / cv_all (B, HKV, M + C, D) memory first -> (B, HQ, T, Dv).

    Causal: the tokens of a row go into the heads as (B, rows, stride * HQ, D), head s * HQ + h:
    a plain reshape of q's (B, T, HQ, D) memory order (no permuting copy), passed to SDPA as a
    transposed view. The keys are repeated per token of the row (head s * HKV + hk), so the GQA
    mapping (head // G) still sends query head h to kv head h // G. The output comes back the
    same way, in (B, T, HQ, Dv) memory order."""
    B, HQ, T, D = q.shape
    HKV = ck_all.shape[1]
    if not causal:
        return F.scaled_dot_product_attention(q, ck_all, cv_all, scale=scale, enable_gqa=HQ != HKV)
    rows = math.ceil(T / stride)
    qt = q.transpose(1, 2)  # (B, T, HQ, D)
    if rows * stride != T:
        qt = F.pad(qt, (0, 0, 0, 0, 0, rows * stride - T))
    qs = qt.reshape(B, rows, stride * HQ, D)
    if num_memory > 1:  # empty rows on top: the memory tokens shift the diagonal
        qs = F.pad(qs, (0, 0, 0, 0, num_memory - 1, 0))
    keys, values = (t.repeat(1, stride, 1, 1) for t in (ck_all, cv_all))
    out = F.scaled_dot_product_attention(qs.transpose(1, 2), keys, values, is_causal=True, scale=scale,
                                         enable_gqa=HQ != HKV)  # (B, stride * HQ, M - 1 + rows, Dv)
    out = out[:, :, num_memory - 1 :].transpose(1, 2)  # (B, rows, stride * HQ, Dv)
    return out.reshape(B, rows * stride, HQ, out.shape[-1])[:, :T].transpose(1, 2)


def pooled_block_scores(q: Tensor, ck: Tensor, *, group_size: int, share_across_group: bool, stride: int,
                        selection_block_size: int) -> Tensor:
    """Unscaled, unmasked block scores (B, H, T, NB): (mean of the group's q) . (mean of the
    r = selection / stride compressed keys of each block). q (B, HQ, T, D), ck (B, HKV, C, D)."""
    B, HQ, T, D = q.shape
    HKV, C = ck.shape[1], ck.shape[2]
    ratio = selection_block_size // stride
    nb = C // ratio
    q_sel = q.view(B, HKV, group_size, T, D).mean(dim=2) if share_across_group else q
    keys = ck[:, :, : nb * ratio].view(B, HKV, nb, ratio, D).mean(dim=3)
    if not share_across_group:
        keys = keys.repeat_interleave(group_size, dim=1)
    return torch.matmul(q_sel, keys.transpose(-1, -2))


def mask_block_logits(logits: Tensor, *, query_pos: Tensor, stride: int, selection_block_size: int,
                      causal: bool) -> Tensor:
    """Causal: blocks not wholly before the query get the masked score; selection blocks larger
    than the stride: the own block gets -finfo.max (as selection.block_importance)."""
    blocks = torch.arange(logits.shape[-1], device=logits.device)
    if causal:
        visible = ((blocks + 1) * selection_block_size)[None, :] <= query_pos[:, None]
        logits = logits.masked_fill(~visible, masked_score(logits.dtype))
    if selection_block_size != stride:
        own = (query_pos // selection_block_size)[:, None] == blocks[None, :]
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
