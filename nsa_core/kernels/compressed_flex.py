"""Compressed attention of packed documents in one FlexAttention call (the kernel path of the
compressed branch for `cu_seqlens`; the PyTorch twin runs reference/compressed_attention.py on each
document alone).

Keys: the M memory tokens, then the T // stride compressed slots, document i's compressed token j
at slot cu_seqlens[i] // stride + j (model/compression.py). The token at position p of document i
sees the memory tokens and the slots [first_i, first_i + n), n = p // stride when causal (the blocks
whose last token (c + 1) * stride - 1 is before p, as in the plain branch) and len_i // stride (all
of its document's blocks) when not: an interval per query, so kernels/flex_intervals.py does the rest.
The intervals come from cu_seqlens on the device (no host read).

Row layout (as the plain branch's staircase, kernels/compressed_sdpa.py): the `stride` tokens of a
row go into the heads, q (1, HQ, T, D) -> (1, stride * HQ, R, D) with R = ceil(T / stride), head
s * HQ + h of row j holding token j * stride + s, and the keys are repeated per token of the row
(kv head s * HKV + hk), so the GQA mapping still sends query head h to kv head h // G. The keys a
row sees advance by one slot per row, the causal shape FlexAttention's kernels are fast on; with
the T tokens as T query rows instead, the backward's dK / dV kernel had only (M + C) / 128 x HKV
programs, each sweeping G heads x T / 128 query tiles: 57 ms of a 64k packed row's 182 ms
forward+backward on the H100, against ~9 ms of backward for the same documents' staircases on cuDNN SDPA.

Dimension legend: HQ query heads, HKV kv heads, T tokens of the packed row, N documents,
M memory tokens, C = T // stride compressed slots, R = ceil(T / stride) rows, D / Dv head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_core.kernels.document_flex import document_bounds
from nsa_core.kernels import flex_intervals


def compressed_intervals(cu_seqlens: Tensor, total: int, num_memory: int, stride: int,
                         causal: bool) -> tuple[Tensor, Tensor]:
    """The key interval [lo, hi) (T,) of every token among M memory tokens + C slots (memory not included)."""
    start, end = document_bounds(cu_seqlens, total)
    first = num_memory + start // stride
    count = (torch.arange(total, device=start.device) - start) // stride if causal else (end - start) // stride
    return first, first + count


def compressed_block_mask(cu_seqlens: Tensor, total: int, num_memory: int, stride: int, causal: bool, heads: int,
                          num_keys: int):
    """The row layout's BlockMask for `heads` query heads over num_keys = M + C keys (module docstring)."""
    lo, hi = compressed_intervals(cu_seqlens, total, num_memory, stride, causal)
    return flex_intervals.interval_block_mask(lo, hi, num_memory, num_keys, tokens_per_row=stride, heads=heads)


def compressed_attention_flex(q: Tensor, ck_all: Tensor, cv_all: Tensor, cu_seqlens: Tensor, num_memory: int,
                              stride: int, causal: bool, scale: float, block_mask=None) -> Tensor:
    """q (1, HQ, T, D), ck_all / cv_all (1, HKV, M + C, D / Dv) memory first, cu_seqlens (N + 1,) on q's
    device -> (1, HQ, T, Dv), in the row layout (module docstring). block_mask: compressed_block_mask's,
    when the caller keeps it (it depends only on the documents and the shape)."""
    _, HQ, T, D = q.shape
    if T == 0:
        return q.new_empty(*q.shape[:-1], cv_all.shape[-1])
    if block_mask is None:
        block_mask = compressed_block_mask(cu_seqlens, T, num_memory, stride, causal, HQ, ck_all.shape[-2])
    rows = -(-T // stride)
    qt = q.transpose(1, 2)  # (1, T, HQ, D)
    if rows * stride != T:
        qt = F.pad(qt, (0, 0, 0, 0, 0, rows * stride - T))
    q_rows = qt.reshape(1, rows, stride * HQ, D).transpose(1, 2)  # (1, stride * HQ, R, D)
    keys, values = (t.repeat(1, stride, 1, 1) for t in (ck_all, cv_all))  # (1, stride * HKV, M + C, D)
    out = flex_intervals.flex(q_rows, keys, values, block_mask, scale)  # (1, stride * HQ, R, Dv)
    out = out.transpose(1, 2).reshape(1, rows * stride, HQ, -1)[:, :T]
    return out.transpose(1, 2)
