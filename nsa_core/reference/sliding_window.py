"""Reference sliding-window attention: query t sees key s when 0 <= t - s <= window (causal)
or |t - s| <= window (not causal).

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, T sequence, D / Dv head dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.reference.masked_softmax import map_query_chunks, masked_attention, query_chunk_size


def sliding_window_reference(
    q: Tensor,  # (B, HQ, T, D)
    k: Tensor,  # (B, HKV, T, D)
    v: Tensor,  # (B, HKV, T, Dv)
    window: int,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    B, HQ, T, D = q.shape
    HKV, Dv = k.shape[1], v.shape[-1]
    G = HQ // HKV
    scale = D ** -0.5 if scale is None else scale
    qg = q.view(B, HKV, G, T, D)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))

    def chunk_fn(start: int, end: int) -> Tensor:
        lo = max(0, start - window)
        hi = end if causal else min(T, end + window)
        q_pos = torch.arange(start, end, device=q.device)[:, None]
        k_pos = torch.arange(lo, hi, device=q.device)[None, :]
        dist = q_pos - k_pos
        allowed = (dist <= window) & ((dist >= 0) if causal else (dist >= -window))
        logits = torch.matmul(qg[:, :, :, start:end], k[:, :, None, lo:hi].transpose(-1, -2)) * scale
        out = masked_attention(logits, allowed, v[:, :, None, lo:hi])
        return out.reshape(B, HQ, end - start, Dv)

    chunk = query_chunk_size(T, 3 * window + 1, HQ, B)
    chunk = max(chunk, 1)
    return map_query_chunks(chunk_fn, T, chunk, needs_grad)
