"""The decoding input checks that the NSA and dense caches and generation share: the valid lengths of a
batch of right-padded prompts, checked once at prefill (an integer tensor (batch,), every value in
1..prompt length), and `lengths` refused after the prefill.

Checking the values reads them on the host: one synchronisation per prefill, never in a decoding step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prompt_lengths(lengths: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
    """lengths (batch,) int32 / int64, or None (every row holds n tokens) -> (batch,) int64 on device;
    a ValueError naming `lengths` otherwise."""
    if lengths is None:
        return torch.full((batch,), n, device=device, dtype=torch.int64)
    if not isinstance(lengths, Tensor) or lengths.dtype not in (torch.int32, torch.int64) or lengths.shape != (batch,):
        raise ValueError(f"lengths must be an integer tensor of shape (batch={batch},), got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}")
    low, high = (int(v) for v in torch.stack((lengths.min(), lengths.max())).tolist())
    if low < 1 or high > n:
        raise ValueError(f"lengths must be in 1..{n} (each row's valid prompt tokens, at most the prompt's length), "
                         f"got values from {low} to {high}")
    return lengths.to(device=device, dtype=torch.int64)


def check_step_lengths(prefill: bool, lengths: Tensor | None) -> None:
    """lengths describes a prompt: a ValueError when it comes with a cache that already holds tokens."""
    if not prefill and lengths is not None:
        raise ValueError("lengths describes a prompt: pass it with an empty cache (the first call)")
