"""Reference rotary embedding with interleaved pairs, as `rotary_embedding_torch` applies it: pair
(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), computed in float32 (float64 stays float64) and
returned in the input's dtype. The twin of kernels/rotary.py; takes the same pair tables.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_reference(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """t (..., n, d); cos / sin (n, P) pair tables, 2P <= d: rotates the first 2P features."""
    return apply_rotary(t, cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1))


def rotary_at_positions_reference(t: Tensor, positions: Tensor, freqs: Tensor) -> Tensor:
    """t (B, H, n, d) whose row b's tokens sit at positions (B, n): pair i turns by position x freqs[i],
    the angles in float32 (float64 for float64 inputs), as RotaryEmbedding.tables computes them."""
    wide = torch.promote_types(t.dtype, torch.float32)
    angles = positions.to(wide)[:, None, :, None] * freqs.to(wide)  # (B, 1, n, P)
    return rotary_reference(t, angles.cos(), angles.sin())


# above this many elements, half-precision inputs are rotated a slice of heads at a time, so the
# float32 temporaries stay small (a (64 heads, 64k, 128) bf16 q would otherwise need ~6 GiB of them)
CHUNK_ELEMENTS = 1 << 26


def apply_rotary(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """t (..., n, d), cos / sin (n, r) with r <= d: rotates the first r features, keeps the rest.
    Computed in float32 (float64 stays float64) and returned in t's dtype."""
    if t.ndim >= 3 and t.numel() > CHUNK_ELEMENTS and t.shape[-3] > 1:
        per_chunk = max(1, t.shape[-3] * CHUNK_ELEMENTS // t.numel())
        return torch.cat([_rotate(part, cos, sin) for part in t.split(per_chunk, dim=-3)], dim=-3)
    return _rotate(t, cos, sin)


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    rot_dim = cos.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    pairs = t_rot.unflatten(-1, (-1, 2))
    rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    out = (t_rot.to(cos.dtype) * cos + rotated_half.to(cos.dtype) * sin).to(t.dtype)
    return torch.cat((out, t_pass), dim=-1) if t_pass.shape[-1] else out
