"""Reference gated combine of the three branches: the twin of kernels/combine.py."""

from __future__ import annotations

import torch
from torch import Tensor


def combine_reference(compressed: Tensor, fine: Tensor, sliding: Tensor, gates: Tensor) -> Tensor:
    """Branches (B, H, N, Dv), gates (B, H, N, 3) -> (B, N, H, Dv). Fused multiply-adds: no
    full-size product temporaries."""
    out = torch.addcmul(compressed * gates[..., 0:1], fine, gates[..., 1:2])
    out = torch.addcmul(out, sliding, gates[..., 2:3])
    return out.transpose(1, 2)
