"""Reference selected-block attention (the fine branch of NSA). Queries may sit after cached keys
(q_offset): query i is at key position q_offset + i.

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV query heads per kv head,
HI heads of the selection (HKV or HQ), T queries, S keys, K selected slots per query, D / Dv head
dims, NB = ceil(S / block_size) key blocks, c a chunk of queries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nsa_core.reference.masked_softmax import map_query_chunks, masked_attention, query_chunk_size


def selected_attention_reference(
    q: Tensor,  # (B, HQ, T, D)
    k: Tensor,  # (B, HKV, S, D)
    v: Tensor,  # (B, HKV, S, Dv)
    indices: Tensor,  # (B, HI, T, K) integer
    block_size: int,
    valid: Tensor | None = None,  # (B, HI, T, K) bool
    gates: Tensor | None = None,  # (B, HI, T, K) float
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    q_offset: int = 0,
) -> Tensor:
    B, HQ, T, D = q.shape
    HKV, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, HI = HQ // HKV, indices.shape[1]
    scale = D ** -0.5 if scale is None else scale
    num_blocks = math.ceil(S / block_size)
    valid = torch.ones_like(indices, dtype=torch.bool) if valid is None else valid
    safe_idx = torch.where(valid, indices, torch.zeros_like(indices)).long().clamp(0, max(num_blocks - 1, 0))
    key_pos = torch.arange(S, device=q.device)
    key_block = key_pos // block_size  # (S,)
    qg = q.view(B, HKV, G, T, D)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, gates)
    )

    def chunk_fn(start: int, end: int) -> Tensor:
        c = end - start
        # per (query, key block): selected? and with what logit multiplier
        hit = torch.zeros(B, HI, c, num_blocks, dtype=q.dtype, device=q.device)
        hit = hit.scatter_add(-1, safe_idx[:, :, start:end], valid[:, :, start:end].to(q.dtype))
        selected = hit > 0
        if gates is not None:
            gate_val = (gates[:, :, start:end] * valid[:, :, start:end]).to(q.dtype)
            mult = torch.zeros(B, HI, c, num_blocks, dtype=q.dtype, device=q.device).scatter_add(
                -1, safe_idx[:, :, start:end], gate_val
            )
        else:
            mult = None
        q_pos = torch.arange(q_offset + start, q_offset + end, device=q.device)
        allowed = selected[..., key_block]  # (B, HI, c, S)
        if causal:
            own = (q_pos[:, None] // block_size) == key_block[None, :]  # (c, S)
            not_future = key_pos[None, :] <= q_pos[:, None]
            allowed = (allowed | own) & not_future
        if window is not None:
            allowed = allowed & (key_pos[None, :] >= q_pos[:, None] - window)
        # shape everything as (B, HKV, G|1, c, S)
        allowed = allowed.view(B, HKV, HI // HKV, c, S)
        logits = torch.matmul(qg[:, :, :, start:end], k[:, :, None].transpose(-1, -2)) * scale
        if mult is not None:
            m = mult[..., key_block]
            if causal:
                m = torch.where(own & ~selected[..., key_block], torch.ones_like(m), m)
            logits = logits * m.view(B, HKV, HI // HKV, c, S)
        out = masked_attention(logits, allowed.expand(B, HKV, G, c, S), v[:, :, None])
        return out.reshape(B, HQ, c, Dv)

    chunk = query_chunk_size(T, S, HQ, B)
    return map_query_chunks(chunk_fn, T, chunk, needs_grad)
