"""Compressed attention of packed documents in one FlexAttention call (the kernel path of the
compressed branch for `cu_seqlens`; the PyTorch twin runs reference/compressed_attention.py on each
document alone).

Keys: the M memory tokens, then the T // stride compressed slots, document i's compressed token j
at slot cu_seqlens[i] // stride + j (model/compression.py). The token at position p of document i
sees the memory tokens and the slots [first_i, first_i + n), n = p // stride when causal (the blocks
whose last token (c + 1) * stride - 1 is before p, as in the plain branch) and len_i // stride (all
of its document's blocks) when not: an interval per query, so kernels/flex_intervals.py does the rest.
The intervals come from cu_seqlens on the device (no host read).

Dimension legend: HQ query heads, HKV kv heads, T tokens of the packed row, N documents,
M memory tokens, C = T // stride compressed slots, D / Dv head dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.kernels.document_flex import document_bounds
from nsa_core.kernels.flex_intervals import interval_attention


def compressed_intervals(cu_seqlens: Tensor, total: int, num_memory: int, stride: int,
                         causal: bool) -> tuple[Tensor, Tensor]:
    """The key interval [lo, hi) (T,) of every token among M memory tokens + C slots (memory not included)."""
    start, end = document_bounds(cu_seqlens, total)
    first = num_memory + start // stride
    count = (torch.arange(total, device=start.device) - start) // stride if causal else (end - start) // stride
    return first, first + count


def compressed_attention_flex(q: Tensor, ck_all: Tensor, cv_all: Tensor, cu_seqlens: Tensor, num_memory: int,
                              stride: int, causal: bool, scale: float) -> Tensor:
    """q (1, HQ, T, D), ck_all / cv_all (1, HKV, M + C, D / Dv) memory first, cu_seqlens (N + 1,) on q's
    device -> (1, HQ, T, Dv)."""
    lo, hi = compressed_intervals(cu_seqlens, q.shape[-2], num_memory, stride, causal)
    return interval_attention(q, ck_all, cv_all, lo, hi, num_memory, scale)
