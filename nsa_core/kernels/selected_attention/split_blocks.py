"""A selection of blocks as the same selection of smaller blocks, for the shapes whose key tile of a
whole block does not fit shared memory (tiles.kernel_block): block j of size `block` becomes the
sub-blocks j * f ... j * f + f - 1 of size block / f, each slot becomes f slots with the slot's gate,
and (causal) the sub-blocks of the query's own block before its own sub-block become f - 1 more
slots (gate 1, -1 where there are fewer): the kernels attend their own sub-block as the own block.
The keys each query sees, with their gates, are unchanged. Device ops only, no host sync; the
gates' gradient flows back through the repeat (the f sub-slots' gradients add up).

Dimension legend: B batch, HI heads of the selection, T queries, S slots, f = block / sub_block.
"""

from __future__ import annotations

import torch


def token_positions(T: int, device: torch.device, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """(T,) int64: each query's position in its sequence (its document's, when packed)."""
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        return t
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    return t - cu[torch.searchsorted(cu, t, right=True) - 1]


def split_selection(idx: torch.Tensor, gates: torch.Tensor | None, block: int, sub_block: int, causal: bool,
                    positions: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """idx (B, HI, T, S) int32, -1 invalid; gates (B, HI, T, S) or None; positions (T,); num_keys:
    the keys (sub-blocks starting past them are invalid: a last block cut short) -> (idx, gates)
    over blocks of sub_block keys: (B, HI, T, S * f (+ f - 1 when causal))."""
    f = block // sub_block
    j = torch.arange(f, device=idx.device, dtype=idx.dtype)
    sub = idx.unsqueeze(-1) * f + j
    sub = torch.where((idx >= 0).unsqueeze(-1) & (sub * sub_block < num_keys), sub, -1).flatten(-2)  # (B, HI, T, S * f)
    if gates is not None:
        gates = gates.repeat_interleave(f, dim=-1)
    if not causal or f == 1:
        return sub.contiguous(), gates
    pos = positions.to(device=idx.device, dtype=torch.int64)
    first = (pos // block * f).view(-1, 1)  # (T, 1): the own block's first sub-block
    before = first + torch.arange(f - 1, device=idx.device)  # (T, f - 1)
    own = torch.where(before < (pos // sub_block).view(-1, 1), before, -1).to(idx.dtype)
    own = own.expand(*idx.shape[:-1], f - 1)
    out = torch.cat((sub, own), dim=-1).contiguous()
    if gates is not None:
        gates = torch.cat((gates, gates.new_ones(*gates.shape[:-1], f - 1)), dim=-1)
    return out, gates
