"""Attention under a boolean mask where a row with no allowed key yields zeros (not NaN),
with gradients that stay finite. Shared by the reference branches."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def masked_attention(logits: Tensor, allowed: Tensor, v: Tensor) -> Tensor:
    """logits, allowed (..., i, j); v (..., j, d) -> (..., i, d). Empty rows give 0."""
    neg = torch.finfo(logits.dtype).min
    masked = logits.masked_fill(~allowed, neg)
    row_max = masked.amax(dim=-1, keepdim=True).detach()
    weights = torch.exp(masked - row_max) * allowed
    denom = weights.sum(dim=-1, keepdim=True)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(weights / denom, v)


def map_query_chunks(fn: Callable[[int, int], Tensor], seq_len: int, chunk: int, needs_grad: bool) -> Tensor:
    """Concatenate fn(start, end) over query chunks along dim -2; re-compute in backward when
    gradients are needed, so only one chunk's score matrix is alive at a time."""
    outs = []
    for start in range(0, seq_len, chunk):
        end = min(seq_len, start + chunk)
        if needs_grad:
            outs.append(checkpoint(fn, start, end, use_reentrant=False))
        else:
            outs.append(fn(start, end))
    return torch.cat(outs, dim=-2)


def query_chunk_size(seq_len: int, keys_per_query: int, heads: int, batch: int, budget: int = 1 << 24) -> int:
    """Largest chunk of queries whose score matrix stays under `budget` elements."""
    per_query = max(1, keys_per_query * heads * batch)
    return max(1, min(seq_len, budget // per_query))
