"""What every kernel shares about its tensors: where outputs are allocated (tests replace
`new_output` to poison them with NaN, so an element a kernel forgets to write fails the test),
and the size the kernels' 32-bit offsets allow."""

from __future__ import annotations

import torch


def new_output(*shape, device, dtype) -> torch.Tensor:
    return torch.empty(*shape, device=device, dtype=dtype)


# Kernels compute offsets within one batch element in 32 bits (the batch offset in 64): every
# tensor they read or write must span fewer elements than this per batch element.
MAX_PER_BATCH_EXTENT = 2**31 - 1


def per_batch_extent(t: torch.Tensor) -> int:
    """Elements one batch element of t spans in memory (1 + the largest offset, batch dim excluded)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]) if size > 0)


def too_large_reason(contiguous: bool = False, **tensors: torch.Tensor) -> str | None:
    """Why the kernels cannot take these tensors (their 32-bit offsets), or None. contiguous: the
    kernels get contiguous copies, so only the element count per batch element matters."""
    for name, t in tensors.items():
        extent = t[0].numel() if contiguous and t.shape[0] > 0 else per_batch_extent(t)
        if extent > MAX_PER_BATCH_EXTENT:
            return f"{name} spans {extent} elements per batch element; kernels take up to {MAX_PER_BATCH_EXTENT} (32-bit offsets)"
    return None
