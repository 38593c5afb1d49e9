"""What every kernel shares about its tensors: where outputs are allocated (tests replace
`new_output` to poison them with NaN, so an element a kernel forgets to write fails the test),
and the size the kernels' offsets allow."""

from __future__ import annotations

import torch


def new_output(*shape, device, dtype) -> torch.Tensor:
    return torch.empty(*shape, device=device, dtype=dtype)


# Kernels compute the offset of a (batch, head) pair in 64 bits (its program index is cast before it
# multiplies a stride) and offsets within one (batch, head) row of a contiguous (B, H, T, D) tensor in
# 32 bits (the common case stays 32-bit vector arithmetic): every tensor they read or write must span
# fewer elements than this per (batch, head) row, T x D < 2**31 (16M tokens at head dim 128).
# Rotary and combine offsets are 64-bit throughout (no bound).
MAX_PER_ROW_EXTENT = 2**31 - 1


def too_large_reason(**tensors: torch.Tensor) -> str | None:
    """Why the attention kernels cannot take these tensors (B, H, T, D) (their 32-bit offsets within
    one (batch, head) row; the kernels get contiguous copies), or None."""
    for name, t in tensors.items():
        extent = t[0, 0].numel() if t.ndim >= 3 and t.shape[0] > 0 and t.shape[1] > 0 else 0
        if extent > MAX_PER_ROW_EXTENT:
            return (f"{name} spans {extent} elements per (batch, head) row; kernels take up to {MAX_PER_ROW_EXTENT} "
                    "(32-bit offsets within a row)")
    return None
