"""sliding_window_attention: the public op (validation + dispatch)."""

from __future__ import annotations

from torch import Tensor

import math

import torch

from nsa_core.ops.backend import check_backend_name, kernel_unavailable_reason
from nsa_core.ops.validation import check_positive_int, check_qkv
from nsa_core.reference.sliding_window import sliding_window_reference

WINDOW_BLOCK = 64  # key block of the kernel path; the window covers ceil(window / 64) blocks + the own block


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, causal: bool = True, scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Attention of each query to the keys within `window` positions of it.

    q (B, HQ, T, D), k (B, HKV, T, D), v (B, HKV, T, Dv), HQ a multiple of HKV.
    Query t sees key s when 0 <= t - s <= window (causal) or |t - s| <= window.
    Returns (B, HQ, T, Dv). Kernel path (causal only): the selected-attention kernels with each
    query's ceil(window / 64) preceding blocks selected and keys before t - window masked.
    """
    check_qkv(q, k, v)
    check_positive_int("window", window)
    check_backend_name(backend)
    wants_kernel = backend == "triton" or (backend == "auto" and q.is_cuda)
    if wants_kernel:
        reason = kernel_unavailable_reason(q.device) or (None if causal else "the kernel path is causal only")
        if reason is None:
            return _window_by_selection(q, k, v, window, scale, backend)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run sliding_window_attention here: {reason}")
    return sliding_window_reference(q, k, v, window, causal=causal, scale=scale)


def _window_by_selection(q, k, v, window, scale, backend):
    from nsa_core.ops.selected_attention import selected_attention

    B, HKV, T = k.shape[0], k.shape[1], k.shape[2]
    before = math.ceil(window / WINDOW_BLOCK)
    own = torch.arange(T, device=q.device) // WINDOW_BLOCK
    idx = own[:, None] - torch.arange(before, 0, -1, device=q.device)[None, :]  # (T, before)
    valid = idx >= 0
    idx, valid = (t.view(1, 1, T, before).expand(B, HKV, T, before) for t in (idx.clamp(min=0), valid))
    return selected_attention(q, k, v, idx, block_size=WINDOW_BLOCK, valid=valid, causal=True, scale=scale,
                              window=window, backend=backend)
