"""Pooled block scoring of packed documents in one pass: every document's selection blocks laid out
in one row of "pooled slots" (device index tensors from cu_seqlens, no host read), and the PyTorch
twin of the packed block top-k kernel (kernels/block_topk.py, block_topk_packed).

Layout, for selection blocks sel = r x stride: document i (tokens cu[i] ... cu[i + 1] - 1, n_i of
them) has NB_i = n_i // sel blocks, as the document alone pools its n_i // stride compressed keys
(reference/pooled_selection.py). Its block b sits at pooled slot cu[i] // sel + b of the
P = T // sel slots (documents never meet: cu[i] // sel + NB_i <= cu[i + 1] // sel) and is the mean
of compressed slots cu[i] // stride + b r ... + r - 1 (reference/documents.py); a slot no document
owns holds a zero key no query sees. A query sees the W = max_seqlen // sel slots from its
document's first one, of which the first NB_i are its document's blocks, numbered from 0.

Dimension legend: B batch (1 when packed), H heads of the selection, HKV kv heads, T tokens,
TC queries of a chunk, N documents, P pooled slots, W blocks of the longest document,
r = sel / stride compressed keys per block, D head dim, S slots per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nsa_core.reference.pooled_selection import mask_block_logits
from nsa_core.reference.selection import select_top_blocks, selection_fields


@dataclass(frozen=True)
class PackedBlocks:
    """Where every document's selection blocks sit, and what every query sees."""

    key_slots: Tensor  # (P, r) int64: the compressed slots each pooled slot averages (0 where unused)
    used: Tensor  # (P,) bool: the slot is a block of some document
    first_slot: Tensor  # (T,) int64: the pooled slot of the query's document's block 0
    num_blocks: Tensor  # (T,) int64: NB of the query's document
    positions: Tensor  # (T,) int64: the query's position in its document
    width: int  # W: blocks of the longest document (a host int, from max_seqlen)


def packed_blocks(cu_seqlens: Tensor, total: int, max_seqlen: int, stride: int,
                  selection_block_size: int) -> PackedBlocks:
    """The pooled-slot layout of documents cu_seqlens (N + 1,) packed into `total` tokens, the
    longest `max_seqlen` long, for selection blocks a multiple of the stride. Device ops only."""
    sel = selection_block_size
    cu = cu_seqlens.long()
    device = cu.device
    tokens = torch.arange(total, device=device)
    doc = torch.searchsorted(cu, tokens, right=True) - 1
    start, end = cu[doc], cu[doc + 1]
    starts = cu[:-1] // sel  # (N,) pooled slot of each document's block 0
    slots = torch.arange(total // sel, device=device)
    owner = torch.searchsorted(starts, slots, right=True) - 1  # the last document starting there owns it
    block = slots - starts[owner]
    used = block < (cu[owner + 1] - cu[owner]) // sel
    first_key = cu[owner] // stride + block * (sel // stride)
    key_slots = first_key[:, None] + torch.arange(sel // stride, device=device)
    return PackedBlocks(key_slots=torch.where(used[:, None], key_slots, 0), used=used, first_slot=start // sel,
                        num_blocks=(end - start) // sel, positions=tokens - start, width=max_seqlen // sel)


def packed_pooled_keys(ck: Tensor, blocks: PackedBlocks) -> Tensor:
    """ck (B, HKV, T // stride, D) -> pooled keys (B, HKV, P, D) of every pooled slot (zero where unused)."""
    P, r = blocks.key_slots.shape
    keys = ck.index_select(2, blocks.key_slots.flatten()).unflatten(2, (P, r)).mean(dim=3)
    return keys.masked_fill(~blocks.used[:, None], 0.0)


def packed_block_logits(scores: Tensor, blocks: PackedBlocks, start: int, end: int, *, scale: float, stride: int,
                        selection_block_size: int, causal: bool) -> Tensor:
    """Unscaled scores (B, H, TC, P) of queries start ... end - 1 -> their logits (B, H, TC, W)
    over their own document's blocks, masked as a lone document's (pooled_selection), the slots
    past the document's blocks -inf (never chosen before a block of it: ties go to the lowest)."""
    W, P = blocks.width, scores.shape[-1]
    window = torch.arange(W, device=scores.device)
    cols = (blocks.first_slot[start:end, None] + window).clamp(max=max(P - 1, 0))
    logits = (scores * scale).gather(-1, cols.expand(*scores.shape[:-1], W))
    logits = mask_block_logits(logits, query_pos=blocks.positions[start:end], stride=stride,
                               selection_block_size=selection_block_size, causal=causal)
    return logits.masked_fill(window >= blocks.num_blocks[start:end, None], float("-inf"))


def select_packed_blocks(logits: Tensor, num_blocks: Tensor, num_slots: int, use_diff_topk: bool, *,
                         forced: tuple[int, int, int, Tensor] | None = None) -> tuple:
    """Logits (B, H, TC, W) and each query's document's blocks (TC,) -> (indices, valid, probs,
    gates) (B, H, TC, S = num_slots): a lone document's selection, the slots it lacks index -1,
    invalid, probability (and gate) 0. forced: select_top_blocks'
    argument, with each query's position in its document (SelectionRule.forced)."""
    shape = (*logits.shape[:-1], num_slots)
    chosen = select_top_blocks(logits, num_slots, use_diff_topk, forced=forced)
    fields = [torch.full(shape, -1, dtype=torch.long, device=logits.device),
              torch.zeros(shape, dtype=torch.bool, device=logits.device), logits.new_zeros(shape),
              logits.new_zeros(shape) if use_diff_topk else None]
    if chosen is None:
        return tuple(fields)
    indices, valid, probs, gates = selection_fields(chosen)
    # a lone document has min(S, NB) slots, at least the forced ones (select_top_blocks)
    slots = num_blocks.clamp(min=0 if forced is None else forced[1] + forced[2])
    exists = (indices < num_blocks[:, None]) & (torch.arange(indices.shape[-1], device=indices.device) < slots[:, None])
    got = (torch.where(exists, indices, -1), valid & exists, probs.masked_fill(~exists, 0.0),
           None if gates is None else gates.masked_fill(~exists, 0.0))
    k = indices.shape[-1]
    return tuple(None if pad is None else torch.cat((part, pad[..., k:]), dim=-1) for part, pad in zip(got, fields))
