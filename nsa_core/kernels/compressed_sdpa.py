"""Compressed attention on PyTorch's fused attention kernels (flash / cuDNN SDPA): the kernel path
of the compressed branch. No Triton here: the staircase below turns the branch into one causal SDPA.

Causal compressed attention is a causal attention in disguise: give query t the row
floor(t / stride) + M - 1 (M memory tokens, M - 1 empty rows on top) with the memory tokens in
front of the compressed keys; top-left causal masking then shows row j + M - 1 the M memory
tokens and compressed blocks 0 .. j-1, exactly the blocks whose last token is before t. The
stride tokens of a row go into the heads, so one SDPA call (GQA included) does the branch,
forward and backward. The PyTorch twin is `reference.compressed_attention`.

Dimension legend: B batch, HQ query heads, HKV kv heads, T queries, M memory tokens,
C compressed blocks, D / Dv head dims.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def compressed_attention_sdpa(q: Tensor, ck_all: Tensor, cv_all: Tensor, num_memory: int, stride: int, causal: bool,
                              scale: float) -> Tensor:
    """q (B, HQ, T, D), ck_all / cv_all (B, HKV, M + C, D) memory first -> (B, HQ, T, Dv).

    Causal: the tokens of a row go into the heads as (B, rows, stride * HQ, D), head s * HQ + h:
    a plain reshape of q's (B, T, HQ, D) memory order (no permuting copy), passed to SDPA as a
    transposed view. The keys are repeated per token of the row (head s * HKV + hk), so the GQA
    mapping (head // G) still sends query head h to kv head h // G. The output comes back the
    same way, in (B, T, HQ, Dv) memory order."""
    B, HQ, T, D = q.shape
    HKV = ck_all.shape[1]
    if not causal:
        return F.scaled_dot_product_attention(q, ck_all, cv_all, scale=scale, enable_gqa=HQ != HKV)
    rows = math.ceil(T / stride)
    qt = q.transpose(1, 2)  # (B, T, HQ, D)
    if rows * stride != T:
        qt = F.pad(qt, (0, 0, 0, 0, 0, rows * stride - T))
    qs = qt.reshape(B, rows, stride * HQ, D)
    if num_memory > 1:  # empty rows on top: the memory tokens shift the diagonal
        qs = F.pad(qs, (0, 0, 0, 0, num_memory - 1, 0))
    keys, values = (t.repeat(1, stride, 1, 1) for t in (ck_all, cv_all))
    out = F.scaled_dot_product_attention(qs.transpose(1, 2), keys, values, is_causal=True, scale=scale,
                                         enable_gqa=HQ != HKV)  # (B, stride * HQ, M - 1 + rows, Dv)
    out = out[:, :, num_memory - 1 :].transpose(1, 2)  # (B, rows, stride * HQ, Dv)
    return out.reshape(B, rows * stride, HQ, out.shape[-1])[:, :T].transpose(1, 2)
