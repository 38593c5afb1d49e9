"""Rotary position embedding with interleaved pairs, as `rotary_embedding_torch` applies it.

Pairs are (x0, x1), (x2, x3), ...; pair i turns by angle `position * freqs[i]`, with
`freqs[i] = theta ** (-2i / dim_head)`. Positions are computed in float32 whatever the input
dtype (the oracle computes them in the input dtype, which loses positions in bf16 past 256).
The `freqs` buffer keeps the oracle's state-dict name `rotary_emb.freqs`. With a kernel backend
the rotation is one Triton pass (`nsa_core.kernels.rotary`, same tables, same arithmetic).
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

    def rotate(self, t: Tensor, offset: int = 0, backend: str = "torch") -> Tensor:
        """Rotate t (..., n, d) as if its tokens sat at positions offset ... offset + n - 1.
        backend: "torch", "triton" (the kernel; raises where it cannot run) or "auto"."""
        from nsa_core.ops.dispatch import use_kernels

        n = t.shape[-2]
        positions = torch.arange(offset, offset + n, device=t.device)
        dtype = torch.promote_types(t.dtype, torch.float32)
        half = self.pair_angles(positions, dtype)
        if use_kernels(backend, t.device, "rotary", None if t.ndim >= 2 and t.shape[-1] >= 2 * half.shape[-1]
                       else f"rotary needs (..., n, d >= {2 * half.shape[-1]}), got {tuple(t.shape)}"):
            from nsa_core.kernels.rotary import rotary_triton

            return rotary_triton(t, half.cos(), half.sin())
        angles = half.repeat_interleave(2, dim=-1)
        return apply_rotary(t, angles.cos(), angles.sin())


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
