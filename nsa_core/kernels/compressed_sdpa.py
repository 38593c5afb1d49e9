"""Compressed attention on PyTorch's fused attention kernels (flash / cuDNN SDPA): the kernel path
of the compressed branch. No Triton here: the staircase below turns the branch into one causal SDPA.

Causal compressed attention is a causal attention in disguise: give query t the row
floor(t / stride) + M - 1 (M memory tokens, M - 1 empty rows on top) with the memory tokens in
front of the compressed keys; top-left causal masking then shows row j + M - 1 the M memory
tokens and compressed blocks 0 .. j-1, exactly the blocks whose last token is before t. The
stride tokens of a row go into the heads, so one SDPA call (GQA included) does the branch,
forward and backward. The PyTorch twin is `reference.compressed_attention`.

Queries after other keys (q_offset > 0: a sequence-parallel shard): the query at position p is
global row floor(p / stride); the front of q is padded by q_offset mod stride so that rows start
at stride boundaries, and the first row is global row R0 = q_offset // stride. Row r must see the M
memory tokens and blocks 0 .. R0 + r - 1: with the keys cut to the M + R0 + L - 1 that the last of
the L rows sees, a lower-right aligned causal mask (torch.nn.attention.bias.causal_lower_right,
flash or memory-efficient kernels) is exactly that staircase, in one call. Rows past the last
compressed block (global row > C, possible near the end of the sequence) see every key: their
queries take one plain SDPA call after the staircase. A late shard (R0 >= L) on cuDNN splits its
staircase into a full rectangle and a small causal triangle instead (`split_staircase`): measured
1.5x faster at R0 = 15 L on an H200, where the lower-right call runs on flash.

Dimension legend: B batch, HQ query heads, HKV kv heads, T queries, M memory tokens,
C compressed blocks, D / Dv head dims, L rows of the staircase, R0 the global row of its first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention.bias import causal_lower_right

from .split_staircase import Partial, cudnn_partial, cudnn_split_runs, split_staircase_attention

# a shard's staircase splits when its first row sees >= SPLIT_FROM_ROWS x its rows of keys: at 128k with
# shards of 8192 (H200) the split took 0.67x / 0.72x / 0.93x the lower-right call's time at first rows of
# 15 / 8 / 2 x the rows, 1.09x at 1 x; in the whole sequence-parallel step at 128k, splitting from 1 x
# measured best (slowest rank x P / whole 1.07 / 1.11 / 1.21 at P = 2 / 4 / 8, against 1.12 / 1.13 / 1.20 from 2 x)
SPLIT_FROM_ROWS = 1


def compressed_attention_sdpa(q: Tensor, ck_all: Tensor, cv_all: Tensor, num_memory: int, stride: int, causal: bool,
                              scale: float, q_offset: int = 0) -> Tensor:
    """q (B, HQ, T, D), ck_all / cv_all (B, HKV, M + C, D) memory first -> (B, HQ, T, Dv); query i
    at position q_offset + i (only causal attention depends on it).

    Causal: the tokens of a row go into the heads as (B, rows, stride * HQ, D), head s * HQ + h:
    a plain reshape of q's (B, T, HQ, D) memory order (no permuting copy), passed to SDPA as a
    transposed view. The keys are repeated per token of the row (head s * HKV + hk), so the GQA
    mapping (head // G) still sends query head h to kv head h // G. The output comes back the
    same way, in (B, T, HQ, Dv) memory order."""
    B, HQ, T, D = q.shape
    HKV = ck_all.shape[1]
    if not causal:
        return F.scaled_dot_product_attention(q, ck_all, cv_all, scale=scale, enable_gqa=HQ != HKV)
    if q_offset > 0:
        return _offset_staircase(q, ck_all, cv_all, num_memory, stride, scale, q_offset)
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


def _offset_staircase(q: Tensor, ck_all: Tensor, cv_all: Tensor, num_memory: int, stride: int, scale: float,
                      q_offset: int) -> Tensor:
    """Causal compressed attention of queries at positions q_offset ... q_offset + T - 1: the
    staircase of rows R0 ... (lower-right causal SDPA), then the queries that see every key."""
    B, HQ, T, D = q.shape
    HKV, C = ck_all.shape[1], ck_all.shape[2] - num_memory
    pad, first_row = q_offset % stride, q_offset // stride
    # the queries before (C + 1) * stride see min(p // stride, C) blocks on the staircase; later ones all C
    stair = min(T, max(0, (C + 1) * stride - q_offset))
    parts = []
    if stair > 0:
        rows = math.ceil((pad + stair) / stride)
        qt = F.pad(q[:, :, :stair].transpose(1, 2), (0, 0, 0, 0, pad, rows * stride - pad - stair))  # (B, rows * stride, HQ, D)
        qs = qt.reshape(B, rows, stride * HQ, D).transpose(1, 2)  # (B, stride * HQ, L, D), head s * HQ + h
        visible = num_memory + first_row + rows - 1  # keys the last row sees (<= M + C)
        cut = num_memory + first_row - 1  # keys every row sees
        widen = lambda t: t.repeat(1, stride, 1, 1)  # head s * HKV + hk
        partial = _split_partial(qs, ck_all, cv_all) if first_row >= SPLIT_FROM_ROWS * rows else None
        if partial is not None:  # a late shard: rectangle + triangle on cuDNN beat one lower-right call
            out = split_staircase_attention(qs, widen(ck_all[:, :, :cut]), widen(cv_all[:, :, :cut]),
                                            widen(ck_all[:, :, cut:visible]), widen(cv_all[:, :, cut:visible]),
                                            scale, partial)
        else:
            out = _lower_right_sdpa(qs, widen(ck_all[:, :, :visible]), widen(cv_all[:, :, :visible]), scale)
        out = out.transpose(1, 2).reshape(B, rows * stride, HQ, out.shape[-1])[:, pad : pad + stair]
        parts.append(out.transpose(1, 2))
    if stair < T or not parts:
        parts.append(F.scaled_dot_product_attention(q[:, :, stair:], ck_all, cv_all, scale=scale, enable_gqa=HQ != HKV))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _split_partial(qs: Tensor, ck_all: Tensor, cv_all: Tensor) -> Partial | None:
    """The attention pieces the split staircase runs on, or None where one lower-right call is the path."""
    return cudnn_partial if cudnn_split_runs(qs, ck_all, cv_all) else None


def _lower_right_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal SDPA aligned to the lower right (row r of L sees keys 0 ... S - L + r). Flash takes
    grouped kv heads as they are; the memory-efficient kernel that the lower-right mask otherwise
    runs on does not, so the kv heads are repeated for it (compressed keys: small)."""
    grouped = q.shape[1] != k.shape[1]
    if grouped and not can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True)):
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        grouped = False
    mask = causal_lower_right(q.shape[-2], k.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=grouped)
