"""sliding_window_attention: the public op (validation + dispatch)."""

from __future__ import annotations

from torch import Tensor

from nsa_core.ops.backend import check_backend_name
from nsa_core.ops.validation import check_positive_int, check_qkv
from nsa_core.reference.sliding_window import sliding_window_reference


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, causal: bool = True, scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Attention of each query to the keys within `window` positions of it.

    q (B, HQ, T, D), k (B, HKV, T, D), v (B, HKV, T, Dv), HQ a multiple of HKV.
    Query t sees key s when 0 <= t - s <= window (causal) or |t - s| <= window.
    Returns (B, HQ, T, Dv). Only the torch reference exists for now: backend "triton" raises.
    """
    check_qkv(q, k, v)
    check_positive_int("window", window)
    check_backend_name(backend)
    if backend == "triton":
        raise ValueError("sliding_window_attention has no triton kernel yet; use backend='torch' or 'auto'")
    return sliding_window_reference(q, k, v, window, causal=causal, scale=scale)
