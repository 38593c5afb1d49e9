"""document_attention: dense attention in which every token sees only its own document (validation + dispatch).

The dense layers of the Transformer take packed documents through it. Kernel path: one FlexAttention
call for all documents (kernels/document_flex.py; compiled on CUDA). Reference: one SDPA call per
document (reference/documents.py). A plain batch (no cu_seqlens) is one SDPA call on either path.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from nsa_core.ops.dispatch import check_backend_name, use_kernels
from nsa_core.seqs import Seqs, seqs_for
from nsa_core.ops.validation import check_qkv
from nsa_core.reference.documents import per_document


def document_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                       seqs: Seqs | None = None, backend: str = "auto") -> Tensor:
    """q (B, HQ, T, D), k (B, HKV, T, D), v (B, HKV, T, Dv), HQ a multiple of HKV -> (B, HQ, T, Dv).

    Packed documents (`seqs.cu_seqlens`, batch 1): token t of the document at tokens [start, end) sees
    the keys [start, t] (causal) or [start, end). Otherwise every row is one sequence (causal: query t
    sees keys 0 ... t). Kernel path (packed; fp16, bf16, fp32; head dims 16 ... 256 on CUDA): one
    FlexAttention call; on CPU FlexAttention has no backward, so CPU inputs needing gradients are
    unsupported there (backend="triton" raises)."""
    check_qkv(q, k, v)
    seqs = seqs_for(q, k, seqs)
    check_backend_name(backend)
    if seqs.q_offset:
        raise ValueError("document_attention takes queries over their own keys (seqs without q_offset)")
    gqa = q.shape[1] != k.shape[1]

    def sdpa(s: int, e: int) -> Tensor:
        return F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=causal, scale=scale,
                                              enable_gqa=gqa)

    if not seqs.is_packed:
        return sdpa(0, seqs.q_len)

    def unsupported() -> str | None:
        from nsa_core.kernels.flex_intervals import flex_unsupported_reason

        return flex_unsupported_reason(q, k, v)

    if use_kernels(backend, q.device, "document_attention", unsupported):
        from nsa_core.kernels.document_flex import document_attention_flex

        return document_attention_flex(q, k, v, seqs.cu_seqlens, causal, q.shape[-1] ** -0.5 if scale is None else scale)
    return per_document(sdpa, seqs.spans())
