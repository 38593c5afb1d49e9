"""compressed_attention: queries attend to the memory tokens and the compressed keys (validation + dispatch).

Kernel path: plain batches and queries after other keys (a sequence-parallel shard, queries after
cached keys) take one SDPA call (flash / cuDNN kernels) through the staircase of kernels/compressed_sdpa.py
(with an offset: a lower-right aligned staircase, plus one plain call for queries past the last
compressed block); packed documents take one FlexAttention call for all documents
(kernels/compressed_flex.py: each query sees the memory tokens and an interval of its own document's
compressed slots). PyTorch: reference/fast_compressed.py (masked SDPA over a few query chunks, memory
linear in T) for calls of at least FAST_MIN_SCORES score elements, smaller ones on the loop reference
reference/compressed_attention.py (its twin; as fast there, and its float32 gradients are closer to
float64's: see benchmarks/NOTES.md, CPU path); packed documents one document at a time
(reference/documents.py). A decoding step (`Seqs.step`, ck / cv in a cache's pages: ops/paged.py)
takes decode_attention over the pages of compressed slots each query sees.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops.dispatch import use_kernels
from nsa_core.ops.paged import Pages, paged_call, paged_compressed_attention
from nsa_core.seqs import Seqs, query_seqs
from nsa_core.ops.validation import check_positive_int, check_same_device_dtype
from nsa_core.reference.compressed_attention import compressed_attention_chunked
from nsa_core.reference.fast_compressed import compressed_attention_fast
from nsa_core.reference.documents import compressed_span, per_document


FAST_MIN_SCORES = 1 << 18  # B x HQ x T x (M + C): below it the loop reference runs


def _torch_path(q: Tensor, ck: Tensor, cv: Tensor, num_memory: int, stride: int, causal: bool, scale: float,
                query_offset: int = 0) -> Tensor:
    """The PyTorch side: the fast path for calls of FAST_MIN_SCORES score elements or more."""
    B, HQ, T, _ = q.shape
    small = B * HQ * T * ck.shape[-2] < FAST_MIN_SCORES
    run = compressed_attention_chunked if small else compressed_attention_fast
    return run(q, ck, cv, num_memory, stride, causal, scale, query_offset)


def compressed_attention(q: Tensor, ck: Tensor | Pages, cv: Tensor | Pages, *, num_memory: int, stride: int,
                         causal: bool = True, scale: float | None = None, seqs: Seqs | None = None,
                         backend: str = "auto") -> Tensor:
    """q (B, HQ, T, D); ck (B, HKV, M + C, D), cv (B, HKV, M + C, Dv) with the M = num_memory memory
    tokens first. Causal: compressed block c (last token (c + 1) * stride - 1) is visible to the query
    at position t when that last token is before t; memory tokens always. Returns (B, HQ, T, Dv).
    `seqs`: where the queries sit (default: positions 0 ... T - 1; query i at q_offset + i); packed documents (`seqs.cu_seqlens`):
    ck / cv hold the memory tokens and then T // stride slots, document i's compressed token j at slot
    cu_seqlens[i] // stride + j (model/compression.py), and block c of a document is token c of it.
    Kernel path for packed documents (fp16, bf16, fp32): one FlexAttention call; on CPU it has no
    backward, so CPU inputs needing gradients are unsupported there (backend="triton" raises).
    A decoding step (`seqs` from Seqs.step, causal): ck / cv are Pages of the cache's compressed
    slots (memory tokens first, compressed token c at slot M + c); forward only."""
    check_positive_int("num_memory", num_memory)
    check_positive_int("stride", stride)
    if paged_call(seqs, ck=ck, cv=cv):
        if not causal:
            raise ValueError("a decoding step (Seqs.step) is causal: pass causal=True")
        return paged_compressed_attention(q, ck, cv, num_memory=num_memory, stride=stride,
                                          scale=q.shape[-1] ** -0.5 if scale is None else scale, seqs=seqs,
                                          backend=backend)
    check_same_device_dtype(q=q, ck=ck, cv=cv)
    if ck.shape[-2] < num_memory:
        raise ValueError(f"ck must hold the {num_memory} memory tokens first, got {ck.shape[-2]} tokens")
    seqs = query_seqs(q, seqs)
    if seqs.is_packed and ck.shape[-2] != num_memory + q.shape[-2] // stride:
        raise ValueError(f"packed documents need ck with {num_memory} memory tokens and T // stride = "
                         f"{q.shape[-2] // stride} slots, got {ck.shape[-2]} tokens")
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def unsupported() -> str | None:
        if not seqs.is_packed:
            return None
        from nsa_core.kernels.flex_intervals import flex_unsupported_reason

        return flex_unsupported_reason(q, ck, cv)

    if use_kernels(backend, q.device, "compressed_attention", unsupported):
        if seqs.is_packed:
            from nsa_core.kernels.compressed_flex import compressed_attention_flex, compressed_block_mask

            shape = (q.shape[-2], num_memory, stride, causal, q.shape[1], ck.shape[-2])
            mask = seqs.layout(("compressed_block_mask", *shape),
                               lambda: compressed_block_mask(seqs.cu_seqlens, *shape))
            return compressed_attention_flex(q, ck, cv, seqs.cu_seqlens, num_memory, stride, causal, scale, mask)
        from nsa_core.kernels.compressed_sdpa import compressed_attention_sdpa

        return compressed_attention_sdpa(q, ck, cv, num_memory, stride, causal, scale, seqs.q_offset)
    if seqs.is_packed:
        def document(start: int, end: int) -> Tensor:
            first, last = compressed_span(start, end, stride)
            keys, values = (torch.cat((t[:, :, :num_memory], t[:, :, num_memory + first : num_memory + last]), dim=-2)
                            for t in (ck, cv))
            return _torch_path(q[:, :, start:end], keys, values, num_memory, stride, causal, scale)

        return per_document(document, seqs.spans())
    return _torch_path(q, ck, cv, num_memory, stride, causal, scale, seqs.q_offset)
