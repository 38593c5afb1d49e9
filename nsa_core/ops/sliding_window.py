"""sliding_window_attention: the public op (validation + dispatch)."""

from __future__ import annotations

from torch import Tensor

from nsa_core.ops.backend import check_backend_name, kernel_unavailable_reason, warn_fallback_once
from nsa_core.ops.validation import check_positive_int, check_qkv
from nsa_core.reference.sliding_window import sliding_window_reference


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, causal: bool = True, scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Attention of each query to the keys within `window` positions of it.

    q (B, HQ, T, D), k (B, HKV, T, D), v (B, HKV, T, Dv), HQ a multiple of HKV.
    Query t sees key s when 0 <= t - s <= window (causal) or |t - s| <= window.
    Returns (B, HQ, T, Dv). Kernel path (causal only; fp16, bf16, fp32; D, Dv <= 256): a
    flash-attention band (kernels/sliding_window), forward and backward.
    """
    check_qkv(q, k, v)
    check_positive_int("window", window)
    check_backend_name(backend)
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        reason = kernel_unavailable_reason(q.device) or (None if causal else "the kernel path is causal only")
        if reason is None:
            from nsa_core.kernels.sliding_window.launch import kernel_unsupported_reason

            reason = kernel_unsupported_reason(q, k, v)
        if reason is None:
            from nsa_core.kernels.sliding_window.autograd import sliding_window_triton

            return sliding_window_triton(q, k, v, window, scale)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run sliding_window_attention here: {reason}")
        if causal:  # the non-causal window has no kernel: the module's documented path, not a fallback
            warn_fallback_once("sliding_window_attention", reason)
    return sliding_window_reference(q, k, v, window, causal=causal, scale=scale)
