"""Fast block selection (the fast path; semantics of reference/selection.py) for selection blocks
that are a multiple of the stride.

Per chunk of queries: block scores pooled before the dot product (pooled_selection.py: the
group's mean query against the mean of each block's compressed keys), only over the blocks the
chunk's last query can see (the causal staircase's empty right part is skipped), the scale folded
into the queries. Then, instead of a softmax over a null slot and every block and a top-k over
int64 keys: one softmax over the scored blocks, the null slot folded in afterwards (p = p' / (1 +
e^(null - max logit) p'(max)), an identity, so the gradients are the softmax's too), and a float
top-(k + 1) of p' (through segment maxima on long rows, `largest`). Rows where the k-th and
(k + 1)-th values tie (fewer visible blocks than slots, equal keys) are ranked again with the
reference's exact rule (probabilities, lowest block index first); every row's slots are ordered
as the reference orders them. Forced blocks take the reference's select_top_blocks on the
narrowed logits. Memory linear in T (one chunk's scores at a time).

Equal to `reference.selection` up to rounding (a near-tie may then pick another block, as on the
kernel path).

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, H heads of the selection,
T queries, c queries of a chunk, NB selection blocks that can be scored, W blocks a chunk scores,
S selected slots, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.reference.compressed_attention import masked_score
from nsa_core.reference.masked_softmax import map_query_chunks, query_chunk_size
from nsa_core.reference.pooled_selection import pooled_keys
from nsa_core.reference.selection import (
    NULL_SLOT_LOGIT,
    VALID_THRESHOLD,
    num_scored_blocks,
    select_top_blocks,
    selection_fields,
    top_indices_lowest_first,
)
from nsa_core.selection import Selection, SelectionRule


def chunk_block_logits(q: Tensor, keys: Tensor, rule: SelectionRule, first_pos: int, width: int) -> Tensor:
    """Block logits (B, H, c, width) of the queries q (B, HQ, c, D) at first_pos ... against the
    first `width` pooled keys (B, HKV, NB, D), masked as selection.block_importance masks them."""
    B, HQ, c, D = q.shape
    HKV = keys.shape[1]
    keys = keys[:, :, :width]
    if rule.share_across_group:
        logits = torch.matmul(q.view(B, HKV, rule.group_size, c, D).mean(dim=2) * rule.scale, keys.transpose(-1, -2))
    else:
        logits = torch.matmul((q * rule.scale).view(B, HKV, rule.group_size, c, D), keys[:, :, None].transpose(-1, -2))
        logits = logits.view(B, HQ, c, width)
    sel = rule.selection_block_size
    pos = torch.arange(first_pos, first_pos + c, device=q.device)[:, None]  # (c, 1)
    if rule.causal:
        seen = first_pos // sel  # blocks every query of the chunk sees: nothing to mask there
        blocks = torch.arange(seen, width, device=q.device)
        logits[..., seen:].masked_fill_((blocks + 1) * sel > pos, masked_score(logits.dtype))
    if sel != rule.stride:  # the own block (when causal it is already masked: any value there has probability 0)
        own = torch.arange(width, device=q.device) == pos // sel
        logits.masked_fill_(own, -torch.finfo(logits.dtype).max)
    return logits


SEGMENT = 64  # entries per segment of `largest`


def largest(x: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """x.topk(m) along the last dim (values, indices; which of equal values is returned is not
    specified), through segment maxima when m segments are a small part of the row: the m largest
    entries lie in the m segments of SEGMENT entries with the largest maxima, or in the row's tail
    of fewer than SEGMENT entries, which is always kept."""
    W = x.shape[-1]
    n = W // SEGMENT
    if 4 * m * SEGMENT > W:
        return x.topk(m, dim=-1)
    chosen = x[..., : n * SEGMENT].unflatten(-1, (n, SEGMENT)).amax(dim=-1).topk(m, dim=-1).indices  # (..., m)
    where = (chosen[..., None] * SEGMENT + torch.arange(SEGMENT, device=x.device)).flatten(-2)
    if W > n * SEGMENT:
        tail = torch.arange(n * SEGMENT, W, device=x.device).expand(*where.shape[:-1], W - n * SEGMENT)
        where = torch.cat((where, tail), dim=-1)
    values, picked = x.gather(-1, where).topk(m, dim=-1)
    return values, where.gather(-1, picked)


def row_softmax(logits: Tensor) -> Tensor:
    """softmax over the last dim; rows of fewer than 16 entries in explicit form (torch's CPU
    softmax takes a slow path there: 2.3 ms for 8k rows of 15, against 0.2 ms for rows of 16)."""
    if logits.shape[-1] >= 16:
        return logits.softmax(dim=-1)
    e = torch.exp(logits - logits.detach().amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def top_blocks(logits: Tensor, k: int, use_diff_topk: bool) -> tuple:
    """select_top_blocks(logits, k, use_diff_topk) with the null slot folded in afterwards:
    (indices, valid, probs, gates) of the k slots, (..., k), in the reference's order."""
    shares = row_softmax(logits)  # the probabilities without the null slot: p' = p (1 + e^null / Z)
    flat = shares.detach()
    if logits.shape[-1] > k:
        values, indices = largest(flat, k + 1)  # in descending order
        # a tie among them (the k-th slot shared, or equal selected blocks): these rows ranked exactly
        tied = (values[..., 1:] == values[..., :-1]).any(dim=-1)
        indices = indices[..., :k]
        if bool(tied.any()):
            rows = tied.nonzero(as_tuple=True)
            indices = indices.index_put(rows, top_indices_lowest_first(flat[rows], k))
    else:
        indices = top_indices_lowest_first(flat, k)
    top = indices[..., :1]  # a largest share: the largest logit
    null_share = torch.exp(NULL_SLOT_LOGIT - logits.gather(-1, top)) * shares.gather(-1, top)  # e^null / Z
    probs = shares.gather(-1, indices) / (1 + null_share)
    gates = probs + (1.0 - probs).detach() if use_diff_topk else None
    return indices, probs > VALID_THRESHOLD, probs, gates


def select_blocks_fast(q: Tensor, ck: Tensor, rule: SelectionRule, q_offset: int = 0, budget: int = 1 << 22
                       ) -> Selection | None:
    """select_blocks_reference(q, ck, rule, q_offset) for rule.selection_block_size a multiple of
    rule.stride: q (B, HQ, T, D), compressed keys ck (B, HKV, C, D) without memory tokens."""
    if rule.selection_block_size % rule.stride:
        raise ValueError(f"the fast selection needs selection_block_size a multiple of the stride, got "
                         f"{rule.selection_block_size} and {rule.stride}")
    B, HQ, T, _ = q.shape
    sel = rule.selection_block_size
    nb = num_scored_blocks(ck.shape[-2], rule.stride, sel)
    k = min(rule.num_selected, nb)
    if k == 0:
        return None
    needs_grad = rule.use_diff_topk and torch.is_grad_enabled() and (q.requires_grad or ck.requires_grad)
    heads = ck.shape[1] if rule.share_across_group else HQ
    chunk = query_chunk_size(T, max(1, nb), heads, B, budget=budget)

    def part(start: int, end: int) -> tuple:
        first = q_offset + start
        # causal: a block is visible once it ends at or before the query; at least k columns are kept
        width = min(nb, max(k, (q_offset + end - 1) // sel)) if rule.causal else nb
        logits = chunk_block_logits(q[:, :, start:end], keys, rule, first, width)
        if rule.has_forced_blocks:
            pos = torch.arange(first, q_offset + end, device=q.device)
            return selection_fields(select_top_blocks(logits, rule.num_selected, rule.use_diff_topk,
                                                      forced=rule.forced(pos)))
        return top_blocks(logits, k, rule.use_diff_topk)

    with torch.set_grad_enabled(needs_grad):
        keys = pooled_keys(ck, sel // rule.stride)
        return Selection(*map_query_chunks(part, T, chunk, needs_grad))
