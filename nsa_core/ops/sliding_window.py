"""sliding_window_attention: the public op (validation + dispatch).
Kernels: kernels/sliding_window (causal, any query offset); PyTorch: the fast path reference/fast_window.py
(one batched masked SDPA over query chunks), the twin of the loop reference reference/sliding_window.py.
A decoding step (`Seqs.step`, keys in a cache's pages: ops/paged.py) takes decode_attention over the
pages of each query's window."""

from __future__ import annotations

from torch import Tensor

from nsa_core.ops.dispatch import check_backend_name, use_kernels
from nsa_core.ops.paged import Pages, paged_call, paged_window_attention
from nsa_core.seqs import Seqs, seqs_for
from nsa_core.ops.validation import check_positive_int, check_qkv
from nsa_core.reference.documents import each_sequence
from nsa_core.reference.fast_window import sliding_window_fast


def sliding_window_attention(
    q: Tensor, k: Tensor | Pages, v: Tensor | Pages, *, window: int, causal: bool = True, scale: float | None = None,
    backend: str = "auto", seqs: Seqs | None = None,
) -> Tensor:
    """Attention of each query to the keys within `window` positions of it.

    q (B, HQ, T, D), k (B, HKV, S, D), v (B, HKV, S, Dv), HQ a multiple of HKV; `seqs` says where the
    T queries sit among the S keys (default: a plain batch, S = T, query i at position i).
    Query t sees key s when 0 <= t - s <= window (causal) or |t - s| <= window.
    Returns (B, HQ, T, Dv). Kernel path (causal only; fp16, bf16, fp32; D, Dv <= 256): a
    flash-attention band (kernels/sliding_window), forward and backward, for any query offset
    (a sequence-parallel shard, queries after cached keys). The non-causal window runs on the
    reference by design. Packed documents (`seqs.cu_seqlens`, batch 1): a query sees only the keys of
    its own document (the kernels take them in one launch, each token's document start as the
    band's lower bound). A decoding step (`seqs` from Seqs.step, causal): k / v are Pages of the
    cache's tokens; forward only.
    """
    check_positive_int("window", window)
    check_backend_name(backend)
    if paged_call(seqs, k=k, v=v):
        if not causal:
            raise ValueError("a decoding step (Seqs.step) is causal: pass causal=True")
        return paged_window_attention(q, k, v, window=window, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                      seqs=seqs, backend=backend)
    check_qkv(q, k, v, same_length=False)
    seqs = seqs_for(q, k, seqs)

    def unsupported() -> str | None:
        from nsa_core.kernels.sliding_window.launch import kernel_unsupported_reason

        return kernel_unsupported_reason(q, k, v)

    by_design = None if causal else "the non-causal window runs on the reference"
    if use_kernels(backend, q.device, "sliding_window_attention", unsupported, by_design=by_design):
        from nsa_core.kernels.sliding_window.autograd import sliding_window_triton

        first = seqs.token_doc_start if seqs.is_packed else None
        return sliding_window_triton(q, k, v, window, scale, seqs.q_offset, first)
    # packed documents: the twin runs each document alone
    return each_sequence(lambda q, k, v, seqs: sliding_window_fast(q, k, v, window, causal=causal, scale=scale,
                                                                   q_offset=seqs.q_offset), seqs, q, k, v)
