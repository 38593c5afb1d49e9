"""selected_attention: the public op of NSA's fine branch (validation + dispatch).
Kernels: kernels/selected_attention (every layout: plain batches, queries after other keys, packed
documents). PyTorch: the fast path reference/fast_selected.py (masked SDPA over each query chunk's
union of blocks) wherever its gates allow (_torch_path's rule), else the loop reference
reference/selected_attention.py, the twin both are tested against. A decoding step (`Seqs.step`,
keys in a cache's pages: ops/paged.py) takes decode_attention over the selected pages and the own page."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops.dispatch import check_backend_name, use_kernels
from nsa_core.ops.paged import Pages, paged_call, paged_selected_attention
from nsa_core.seqs import Seqs, seqs_for
from nsa_core.ops.validation import check_positive_int, check_qkv
from nsa_core.reference.documents import each_sequence
from nsa_core.reference.fast_selected import fast_selected_reason, row_factors, selected_attention_fast
from nsa_core.reference.selected_attention import selected_attention_reference


def _check_selection(q: Tensor, k: Tensor, indices: Tensor, valid: Tensor | None, gates: Tensor | None) -> None:
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    B, HQ, T, _ = q.shape
    HKV = k.shape[1]
    if indices.ndim != 4 or indices.shape[0] != B or indices.shape[2] != T or indices.shape[1] not in (HKV, HQ):
        raise ValueError(
            f"indices must have shape (B={B}, {HKV} or {HQ}, T={T}, S), got {tuple(indices.shape)}"
        )
    if valid is not None:
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
            raise TypeError("valid must be a bool tensor or None")
        if valid.shape != indices.shape:
            raise ValueError(f"valid must have the shape of indices {tuple(indices.shape)}, got {tuple(valid.shape)}")
    if gates is not None:
        if not isinstance(gates, Tensor) or not gates.dtype.is_floating_point:
            raise TypeError("gates must be a floating tensor or None")
        if gates.shape != indices.shape:
            raise ValueError(f"gates must have the shape of indices {tuple(indices.shape)}, got {tuple(gates.shape)}")


def selected_attention(
    q: Tensor,
    k: Tensor | Pages,
    v: Tensor | Pages,
    indices: Tensor,
    *,
    block_size: int,
    valid: Tensor | None = None,
    gates: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    backend: str = "auto",
    seqs: Seqs | None = None,
) -> Tensor:
    """Attention of each query to the key blocks it selected.

    Args:
        q: (B, HQ, T, D); k: (B, HKV, N, D); v: (B, HKV, N, Dv); HQ = G x HKV for any G >= 1; N = T
            unless `seqs` places the queries among more keys.
        indices: (B, HKV or HQ, T, S) integer: the S key blocks each query selected; block j holds
            keys j*block_size ... (j+1)*block_size - 1, cut at N. With HQ heads every query head
            has its own selection, with HKV heads the G query heads of a group share it.
        valid: same shape, bool (None = all valid): which slots are real. Within one query's valid
            slots a block appears at most once.
        gates: same shape, float, optional and differentiable: multiplies the attention logits of
            the keys of that slot's block (NSA's straight-through top-k gate).
        causal: a query never sees keys after itself, and always attends its own block (causally)
            besides the selected ones; the own block should not be among the valid slots.
            Not causal: only the selected blocks.
        scale: logit scale, default D ** -0.5.
        window: if given, keys more than `window` positions before the query are masked too
            (the sliding window is this op with the blocks before the own block selected).
        backend: "torch" (reference), "triton" (kernels; raises where they cannot run) or "auto".
        seqs: where the queries sit among the keys (default: a plain batch, T queries over T keys).
            Queries after other keys (`seqs.q_offset`: a sequence-parallel shard over the gathered
            keys, queries after cached keys): query i sits at key position q_offset + i, for its
            causal limit, its window and its own block; the kernels take the offset (both schemes).
            Packed documents (`seqs.cu_seqlens`, batch 1): block indices count from the query's
            document start, blocks are cut at its end, and no key of another document is seen.
            The kernels take them in one launch (launch.packed_block_table; the forward by block or
            by tile for small groups, else by query).
            A decoding step (Seqs.step, causal, no gates): k / v are Pages of the cache's tokens,
            pages of block_size; forward only.

    A query with no key at all gets a zero output. Returns (B, HQ, T, Dv).

    Determinism: for groups of up to 8 query heads per selection the kernels' backward adds dq
    atomically (float32), so reruns can differ in dq's last bits; under
    torch.use_deterministic_algorithms(True) it takes a bit-reproducible path instead.
    """
    check_positive_int("block_size", block_size)
    if window is not None:
        check_positive_int("window", window)
    check_backend_name(backend)
    if paged_call(seqs, k=k, v=v):
        if not causal or gates is not None or window is not None:
            raise ValueError("a decoding step (Seqs.step) over pages is causal, without gates or window")
        return paged_selected_attention(q, k, v, indices, valid, block_size=block_size,
                                        scale=q.shape[-1] ** -0.5 if scale is None else scale, seqs=seqs,
                                        backend=backend)
    check_qkv(q, k, v, same_length=False)
    seqs = seqs_for(q, k, seqs)
    _check_selection(q, k, indices, valid, gates)

    def unsupported() -> str | None:
        from nsa_core.kernels.selected_attention.launch import kernel_unsupported_reason

        return kernel_unsupported_reason(q, k, v, block_size)

    if use_kernels(backend, q.device, "selected_attention", unsupported):
        from nsa_core.kernels.selected_attention.autograd import selected_attention_triton

        return selected_attention_triton(q, k, v, indices, block_size, valid, gates, causal, scale, window,
                                         seqs.cu_seqlens, seqs.q_offset)

    def torch_path(q, k, v, indices, valid, gates, seqs: Seqs) -> Tensor:
        return _torch_path(q, k, v, indices, block_size, valid, gates, causal, scale, window, seqs.q_offset)

    return each_sequence(torch_path, seqs, q, k, v, indices, valid, gates)  # packed: the twin, each document alone


def _torch_path(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, block_size: int, valid: Tensor | None,
                gates: Tensor | None, causal: bool, scale: float | None, window: int | None,
                q_offset: int = 0) -> Tensor:
    """The PyTorch side: the fast path for every input but gates it cannot fold into the queries
    (differentiable ones, or ones differing between a query's blocks: use_diff_topk), which take
    the loop reference. Checking the gates reads them on the host (CPU tensors: free)."""
    factors = None
    if gates is not None and fast_selected_reason(gates) is None:
        every = torch.ones_like(indices, dtype=torch.bool) if valid is None else valid
        factors = row_factors(indices, every, gates.to(q.dtype), causal)
    if gates is None or factors is not None:
        return selected_attention_fast(q, k, v, indices, block_size, valid, factors, causal, scale, window, q_offset)
    return selected_attention_reference(q, k, v, indices, block_size, valid, gates, causal, scale, window,
                                        q_offset=q_offset)
