"""decode_attention: queries of a decoding step over lists of key pages (validation + dispatch).

One op serves NSA's three branches at decode time (the selected blocks and the own block, the
window's blocks, the compressed-key pool): each query attends the pages listed for it, keys at
logical index j = page * page_size + offset visible when lo <= j <= hi. Kernel: a paged split-K
("flash-decoding") Triton kernel (kernels/decode); PyTorch: off CUDA reference/fast_decode.py (the
reference's weighting without its per-value non-finite test where every listed value is finite; it
reads that test on the host), on CUDA reference/paged_decode.py itself (no host read, so a decoding
step that falls back to it can still be captured in a CUDA graph). The branch ops call it for a
decoding step over a cache's pages (ops/paged.py builds the page lists). Forward only (inference).

Dimension legend: B batch, HQ query heads, HKV kv heads, HI heads of a page list (HKV: shared by a
group, or HQ), K queries per sequence, S listed pages, P pages in the pool, D / Dv head dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.ops.dispatch import use_kernels


def decode_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, blocks: Tensor | None,
                     valid: Tensor | None, hi: Tensor, lo: Tensor | None = None, *, scale: float, backend: str = "auto",
                     lists: str = "listed", window: int = 0) -> Tensor:
    """q (B, HQ, K, D); k_pages (P, HKV, page, D), v_pages (P, HKV, page, Dv); block_table (B, pages per
    sequence) int: logical page -> physical page; blocks / valid (B, HI, K, S): the logical pages each
    query attends (valid=False slots are skipped, never read); hi / lo (B, K): the visible logical key
    indices (lo None: 0). A query with no visible key gets zeros. Returns (B, HQ, K, Dv).
    lists="listed_and_own": each query also attends its own page hi // page (after its listed ones);
    lists="window" (blocks, valid, lo None): each query attends the keys hi - window ... hi. The kernel
    forms those lists itself; the PyTorch paths expand them (reference.paged_decode.expand_lists)."""
    B, HQ, K, D = q.shape
    if lists == "window":
        if blocks is not None or valid is not None or lo is not None:
            raise ValueError("lists='window' forms each query's pages itself: blocks, valid and lo must be None")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"lists='window' needs window, an int >= 1, got {window!r}")
    elif lists not in ("listed", "listed_and_own"):
        raise ValueError(f"lists must be 'listed', 'listed_and_own' or 'window', got {lists!r}")
    elif blocks is None or valid is None:
        raise ValueError(f"lists={lists!r} needs blocks and valid tensors")
    if k_pages.ndim != 4 or v_pages.shape[:3] != k_pages.shape[:3] or k_pages.shape[-1] != D:
        raise ValueError(f"k_pages must be (P, HKV, page, D={D}) and v_pages (P, HKV, page, Dv), got "
                         f"{tuple(k_pages.shape)}, {tuple(v_pages.shape)}")
    HKV = k_pages.shape[1]
    if HQ % HKV != 0:
        raise ValueError(f"query heads ({HQ}) must be a multiple of the pages' kv heads ({HKV})")
    if blocks is not None and (blocks.ndim != 4 or blocks.shape[0] != B or blocks.shape[2] != K
                               or blocks.shape[1] not in (HKV, HQ)):
        raise ValueError(f"blocks must be (B={B}, {HKV} or {HQ}, K={K}, S), got {tuple(blocks.shape)}")
    if blocks is not None and (valid.shape != blocks.shape or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool tensor of blocks' shape {tuple(blocks.shape)}")
    if hi.shape != (B, K) or (lo is not None and lo.shape != (B, K)):
        raise ValueError(f"hi and lo must be (B={B}, K={K})")

    def unsupported() -> str | None:
        from nsa_core.kernels.decode.op import PAGE_SIZES
        from nsa_core.kernels.limits import dtype_reason, head_dim_reason

        if k_pages.shape[2] not in PAGE_SIZES:
            return f"the decode kernel takes pages (selection blocks) of {PAGE_SIZES} tokens, got {k_pages.shape[2]}"
        return dtype_reason(q) or head_dim_reason(D, v_pages.shape[-1])

    if use_kernels(backend, q.device, "decode_attention", unsupported):
        from nsa_core.kernels.decode import paged_decode_attention

        return paged_decode_attention(q, k_pages, v_pages, block_table, blocks, valid, hi, lo, scale=scale,
                                      lists=lists, window=window)
    from nsa_core.reference.paged_decode import expand_lists

    blocks, valid, lo = expand_lists(lists, blocks, valid, hi, lo, window=window, page_size=k_pages.shape[2],
                                     kv_heads=HKV)
    if q.device.type == "cuda":  # capturable: no host read of the output
        from nsa_core.reference.paged_decode import paged_decode_reference

        return paged_decode_reference(q, k_pages, v_pages, block_table, blocks, valid, hi, lo, scale)
    from nsa_core.reference.fast_decode import paged_decode_fast

    return paged_decode_fast(q, k_pages, v_pages, block_table, blocks, valid, hi, lo, scale)
