"""Fast compressed attention (the fast path; semantics of reference/compressed_attention.py).

Causal: query t sees the M memory tokens and the first min(C, t // stride) compressed blocks, a
prefix of the keys; the queries are cut into a few chunks, each one masked SDPA call over the keys
its last query can see (the staircase's empty upper part is skipped). Not causal: one call per
group of queries over every key. Memory linear in T (no score matrix is kept).

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, T queries, M memory tokens,
C compressed blocks, K keys of a chunk, c queries of a chunk, D / Dv head dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.reference.fast_masked import clean_keys, masked_sdpa

CHUNKS = 8  # query chunks of the causal staircase: the computed keys are ~ (1 + 1 / CHUNKS) / 2 of all


def compressed_attention_fast(q: Tensor, ck: Tensor, cv: Tensor, num_memory: int, stride: int, causal: bool = True,
                              scale: float | None = None, query_offset: int = 0, budget: int = 1 << 24) -> Tensor:
    B, HQ, T, D = q.shape
    HKV, MC = ck.shape[1], ck.shape[2]
    G, C, M = HQ // HKV, MC - num_memory, num_memory
    scale = D ** -0.5 if scale is None else scale
    ck, cv, bad = clean_keys(ck, cv)
    # the first bad key in key order (memory first): a query is poisoned when its prefix holds it
    first_bad = torch.where(bad, torch.arange(MC, device=q.device), MC).amin(dim=-1)  # (B, HKV)
    # chunks: a few for the staircase, and small enough for the mask and the call's working set
    chunk = -(-T // CHUNKS) if causal else T
    chunk = max(1, min(chunk, budget // max(1, B * HQ * MC)))
    parts = []
    # split, not sliced: the backward pass then joins the chunks' gradients once (a slice's gradient
    # is a zero tensor of q's size per chunk)
    for start, qc in zip(range(0, T, chunk), q.split(chunk, dim=-2)):  # qc (B, HQ, c, D)
        end = min(T, start + chunk)
        pos = torch.arange(query_offset + start, query_offset + end, device=q.device)  # (c,)
        # the kv heads are shared by SDPA (GQA), the mask by every head
        if causal:
            visible = M + (pos // stride).clamp(max=C)  # (c,) keys each query sees, a prefix
            K = M + min(C, (query_offset + end - 1) // stride)
            allowed = torch.arange(K, device=q.device) < visible[:, None]  # (c, K)
            mask = allowed
            reached = (first_bad[:, :, None] < visible).repeat_interleave(G, dim=1)  # (B, HQ, c)
        else:
            K, mask = MC, None
            reached = (first_bad < MC).repeat_interleave(G, dim=1)[:, :, None]
        parts.append(masked_sdpa(qc, ck[:, :, :K], cv[:, :, :K], mask, scale, reached, empty=False))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
