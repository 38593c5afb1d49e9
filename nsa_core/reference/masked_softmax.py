"""Attention under a boolean mask where a row with no allowed key yields zeros (not NaN), with
gradients that stay finite; and the one query-chunk loop every reference branch runs through, so
score matrices exist one chunk at a time (memory linear in the sequence length)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def masked_softmax(logits: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the last dim of the allowed entries; a row with none allowed gives zeros."""
    neg = torch.finfo(logits.dtype).min
    masked = logits.masked_fill(~allowed, neg)  # NaN logits of disallowed keys are gone here
    row_max = masked.amax(dim=-1, keepdim=True).detach()
    weights = torch.exp(masked - row_max) * allowed
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(denom > 0, denom, torch.ones_like(denom))


def split_non_finite(v: Tensor) -> tuple[Tensor, Tensor]:
    """(v with its non-finite rows zeroed, (..., j) mask of those rows)."""
    bad = ~torch.isfinite(v).all(dim=-1)
    return v.masked_fill(bad[..., None], 0.0), bad


def poison(out: Tensor, reached: Tensor) -> Tensor:
    """out (..., i, d) with NaN in the rows where `reached` (..., i) is set."""
    return out.masked_fill(reached[..., None], float("nan"))


def weighted_values(weights: Tensor, v: Tensor) -> Tensor:
    """weights (..., i, j) @ v (..., j, d), where a weight of exactly 0 ignores its value even when that
    value is NaN or infinite (a masked future token must not reach an earlier query), and a non-zero
    weight on a non-finite value makes the row NaN."""
    clean, bad = split_non_finite(v)
    reached = torch.matmul((weights != 0).to(weights.dtype), bad.to(weights.dtype)[..., None])[..., 0] > 0
    return poison(torch.matmul(weights, clean), reached)


def masked_attention(logits: Tensor, allowed: Tensor, v: Tensor) -> Tensor:
    """logits, allowed (..., i, j); v (..., j, d) -> (..., i, d). Empty rows give 0; a NaN or infinite
    value or logit of a key a row does not allow never reaches that row."""
    return weighted_values(masked_softmax(logits, allowed), v)


ChunkOutput = Tensor | tuple  # a tensor, or a tuple of tensors (or None) joined element-wise


def map_query_chunks(fn: Callable[[int, int], ChunkOutput], seq_len: int, chunk: int, needs_grad: bool) -> ChunkOutput:
    """Concatenate fn(start, end) over query chunks along dim -2 (element-wise for tuples; None
    entries stay None). With needs_grad and more than one chunk, each chunk is re-computed in the
    backward pass, so only one chunk's score matrix is alive at a time."""
    parts = []
    for start in range(0, seq_len, chunk):
        end = min(seq_len, start + chunk)
        if needs_grad and chunk < seq_len:
            parts.append(checkpoint(fn, start, end, use_reentrant=False))
        else:
            parts.append(fn(start, end))
    if isinstance(parts[0], Tensor):
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
    return tuple(
        None if first is None else (first if len(parts) == 1 else torch.cat([p[i] for p in parts], dim=-2))
        for i, first in enumerate(parts[0])
    )


def query_chunk_size(seq_len: int, keys_per_query: int, heads: int, batch: int, budget: int = 1 << 24) -> int:
    """Largest chunk of queries whose score matrix stays under `budget` elements, each query
    seeing `keys_per_query` keys whatever the chunk."""
    per_query = max(1, keys_per_query * heads * batch)
    return max(1, min(seq_len, budget // per_query))


def band_chunk_size(seq_len: int, reach: int, heads: int, batch: int, budget: int = 1 << 24) -> int:
    """Largest chunk c of queries whose keys (the chunk itself plus `reach` keys around it, a window's
    c + reach) give a score matrix c x (c + reach) x heads x batch under `budget` elements."""
    per_row = max(1, heads * batch)
    limit = budget / per_row  # c * (c + reach) <= limit
    c = int((-reach + math.sqrt(reach * reach + 4 * limit)) / 2)
    return max(1, min(seq_len, c))
