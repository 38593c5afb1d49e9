"""The selected-attention kernel benchmarks' shared protocol (../shared/BENCHMARKS.md): the paper
shape (4 kv heads, head dim 128, selection blocks of 64, 16 selected per query) and the random
causal selections every kernel benchmark draws.

Dimension legend: T queries and keys, S selected slots, NB blocks.
"""

from __future__ import annotations

import math

import torch

HKV, D, BLOCK, S = 4, 128, 64, 16


def random_indices(T: int, heads: int, device="cuda", seed=0):
    """S distinct random blocks strictly before each query's own block -> (indices, valid) (1, heads, T, S);
    slots past the available count are invalid."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = math.ceil(T / BLOCK)
    own = torch.arange(T, device=device)[:, None] // BLOCK
    scores = torch.rand(1, heads, T, nb, device=device, generator=gen)
    scores = scores.masked_fill(torch.arange(nb, device=device)[None, :] >= own, -1.0)
    top = scores.topk(S, dim=-1)
    del scores
    return top.indices, top.values >= 0


def kernel_indices(T: int, heads: int, seed=0) -> torch.Tensor:
    """random_indices as the launchers take them: int32, -1 in invalid slots, contiguous."""
    idx, valid = random_indices(T, heads, seed=seed)
    return torch.where(valid, idx, -1).to(torch.int32).contiguous()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b (Frobenius norms, in float32)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
