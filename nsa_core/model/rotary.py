"""Rotary position tables: `freqs` (the oracle's state-dict name `rotary_emb.freqs`) and the cos / sin
of each rotated pair at given positions. Applying them is the op `nsa_core.ops.rotary`.

Pair i turns by angle `position * freqs[i]`, with `freqs[i] = theta ** (-2i / dim_head)`. Angles are
computed in float32 whatever the input dtype (float64 for float64 inputs): the oracle computes them in
the input dtype, which loses positions in bf16 past 256.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    def __init__(self, dim_head: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim_head, 2)[: dim_head // 2].float() / dim_head))
        self.register_buffer("freqs", freqs, persistent=True)

    def pair_angles(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """positions (n,) -> angles (n, len(freqs)): one per rotated pair."""
        return positions.to(dtype)[:, None] * self.freqs.to(dtype)[None, :]

    def tables(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (n, pairs) of the tokens at `positions`, for inputs of `dtype`."""
        angles = self.pair_angles(positions, torch.promote_types(dtype, torch.float32))
        return angles.cos(), angles.sin()
