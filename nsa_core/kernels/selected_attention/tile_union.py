"""The union of selected blocks of each query tile, for the by-tile forward (forward_by_tile.py).

A tile is TOKENS consecutive queries of one (batch, selection head). Each query's slots (its S
selected blocks, plus its own block when causal: slot S) are gathered per tile, sorted, duplicates
and invalid slots (-1) replaced by a sentinel, and sorted again: the distinct blocks come first, in
increasing order, and their count per tile tells the kernel how far to walk. Memory linear in the
queries (B x HI x TQ x (S + 1) block ids, twice), device ops only, no host sync.

Dimension legend: B batch, HI heads of the selection, TQ queries (padded to NT x TOKENS), S slots,
S1 = S + 1 (causal: the own block) or S, NT tiles, U = TOKENS x S1 union entries per tile.
"""

from __future__ import annotations

import torch

SENTINEL = torch.iinfo(torch.int32).max


def own_blocks(TQ: int, block_size: int, q_offset: int, table: torch.Tensor | None, device) -> torch.Tensor:
    """(TQ,) int32: each query's own block (packed: its own virtual block, the table's third part)."""
    if table is not None:
        return table[table.numel() - TQ:]
    return ((torch.arange(TQ, device=device) + q_offset) // block_size).to(torch.int32)


def tile_slots(idx: torch.Tensor, own: torch.Tensor | None, tokens: int) -> torch.Tensor:
    """idx (B, HI, TQ, S) int32 (-1 invalid), own (TQ,) or None -> (B, HI, NT * TOKENS, S1) int32
    contiguous: the slots, the own block appended as slot S, queries past TQ all -1."""
    B, HI, TQ, S = idx.shape
    if own is not None:
        idx = torch.cat((idx, own.to(idx.dtype).view(1, 1, TQ, 1).expand(B, HI, TQ, 1)), dim=-1)
    pad = -TQ % tokens
    if pad:
        idx = torch.cat((idx, idx.new_full((B, HI, pad, idx.shape[-1]), -1)), dim=2)
    return idx.contiguous()


def tile_union(slots: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slots (B, HI, NT * TOKENS, S1) -> (union (B, HI, NT, U) int32: each tile's distinct valid
    blocks in increasing order, then SENTINEL; count (B, HI, NT) int32 of distinct blocks)."""
    B, HI, T, S1 = slots.shape
    flat = slots.reshape(B, HI, T // tokens, tokens * S1)
    flat = torch.where(flat >= 0, flat, SENTINEL)
    ordered = flat.sort(dim=-1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    ordered = torch.where(repeat, SENTINEL, ordered).sort(dim=-1).values
    count = (ordered != SENTINEL).sum(dim=-1, dtype=torch.int32)
    return ordered.contiguous(), count
