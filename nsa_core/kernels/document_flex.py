"""Dense attention of packed documents in one FlexAttention call (the kernel path of
ops/document_attention.py; the PyTorch twin is one SDPA call per document).

The token t of the document at tokens [start, end) sees the keys [start, t] when causal and
[start, end) when not: an interval per query, so kernels/flex_intervals.py does the rest. The
intervals come from cu_seqlens on the device (no host read).

Dimension legend: HQ query heads, HKV kv heads, T tokens of the packed row, N documents, D / Dv head dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.kernels.flex_intervals import interval_attention


def document_bounds(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """cu_seqlens (N + 1,) -> (start, end) (T,) int64 of every token's document (empty documents skipped)."""
    cu = cu_seqlens.long()
    tokens = torch.arange(total, device=cu.device)
    doc = torch.searchsorted(cu, tokens, right=True) - 1  # the last document starting at or before the token
    return cu[doc], cu[doc + 1]


def document_intervals(cu_seqlens: Tensor, total: int, causal: bool) -> tuple[Tensor, Tensor]:
    """The key interval [lo, hi) (T,) of every token: its document, up to itself when causal."""
    start, end = document_bounds(cu_seqlens, total)
    return start, (torch.arange(1, total + 1, device=start.device) if causal else end)


def document_attention_flex(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool,
                            scale: float) -> Tensor:
    """q (1, HQ, T, D), k (1, HKV, T, D), v (1, HKV, T, Dv), cu_seqlens (N + 1,) on q's device -> (1, HQ, T, Dv)."""
    lo, hi = document_intervals(cu_seqlens, q.shape[-2], causal)
    return interval_attention(q, k, v, lo, hi, 0, scale)
