"""Reference sliding-window attention: query t sees key s when 0 <= t - s <= window (causal)
or |t - s| <= window (not causal). Queries may sit after cached keys (seqs.q_offset).

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, T queries, S keys, D / Dv head dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.reference.masked_softmax import band_chunk_size, map_query_chunks, masked_attention


def sliding_window_reference(
    q: Tensor,  # (B, HQ, T, D)
    k: Tensor,  # (B, HKV, S, D)
    v: Tensor,  # (B, HKV, S, Dv)
    window: int,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int = 0,
) -> Tensor:
    B, HQ, T, D = q.shape
    HKV, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // HKV
    scale = D ** -0.5 if scale is None else scale
    qg = q.view(B, HKV, G, T, D)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))

    def chunk_fn(start: int, end: int) -> Tensor:
        first, last = q_offset + start, q_offset + end  # key positions of the chunk's queries
        lo = max(0, first - window)
        hi = last if causal else min(S, last + window)
        q_pos = torch.arange(first, last, device=q.device)[:, None]
        k_pos = torch.arange(lo, hi, device=q.device)[None, :]
        dist = q_pos - k_pos
        allowed = (dist <= window) & ((dist >= 0) if causal else (dist >= -window))
        logits = torch.matmul(qg[:, :, :, start:end], k[:, :, None, lo:hi].transpose(-1, -2)) * scale
        out = masked_attention(logits, allowed, v[:, :, None, lo:hi])
        return out.reshape(B, HQ, end - start, Dv)

    chunk = band_chunk_size(T, (1 if causal else 2) * window + 1, HQ, B)
    return map_query_chunks(chunk_fn, T, chunk, needs_grad)
