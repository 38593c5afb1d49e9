"""sliding_window_attention: the public op (validation + dispatch)."""

from __future__ import annotations

from torch import Tensor

from nsa_core.ops.dispatch import check_backend_name, use_kernels
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

    def unsupported() -> str | None:
        if not causal:
            return "the kernel path is causal only"
        from nsa_core.kernels.sliding_window.launch import kernel_unsupported_reason

        return kernel_unsupported_reason(q, k, v)

    # "auto" without causality: the reference is the documented path (no kernel to fall back from)
    if (causal or backend == "triton") and use_kernels(backend, q.device, "sliding_window_attention", unsupported):
        from nsa_core.kernels.sliding_window.autograd import sliding_window_triton

        return sliding_window_triton(q, k, v, window, scale)
    return sliding_window_reference(q, k, v, window, causal=causal, scale=scale)
