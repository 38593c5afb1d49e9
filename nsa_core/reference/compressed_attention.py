"""Reference compressed attention: queries attend to the memory tokens and the compressed keys.

Causal rule: compressed block c (covering tokens up to (c + 1) * stride - 1) is visible to
query t only when (c + 1) * stride - 1 < t; memory tokens are always visible.
`compressed_scores` gives the scaled logits of the compressed blocks (memory dropped), with
invisible entries set to `masked_score`: the selection branch scores blocks from them.

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, T queries,
M memory tokens, C compressed blocks, D / Dv head dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.reference.masked_softmax import map_query_chunks, query_chunk_size, weighted_values


def masked_score(dtype: torch.dtype) -> float:
    """The fill value of invisible compressed logits: -finfo.max // 10, as the oracle uses.
    Finite, so interpolating and averaging it never makes NaN."""
    return float(-torch.finfo(dtype).max // 10)


def position_column(query_pos: Tensor) -> Tensor:
    """Query positions (T,) -> (T, 1), or per row (B, T) -> (B, 1, T, 1): broadcasts against
    (B, H, T, blocks) scores."""
    col = query_pos[..., None]
    return col if query_pos.ndim == 1 else col[:, None]


def compressed_visibility(query_pos: Tensor, num_blocks: int, stride: int) -> Tensor:
    """Query positions (T,) or (B, T) -> (T, C) or (B, 1, T, C) bool: block c visible to the query."""
    block_last = (torch.arange(num_blocks, device=query_pos.device) + 1) * stride - 1
    return block_last < position_column(query_pos)


def compressed_attention_reference(
    q: Tensor,  # (B, HQ, T, D)
    ck: Tensor,  # (B, HKV, M + C, D): memory tokens first
    cv: Tensor,  # (B, HKV, M + C, Dv)
    num_memory: int,
    stride: int,
    causal: bool = True,
    scale: float | None = None,
    query_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Returns (out (B, HQ, T, Dv), scores (B, HQ, T, C)), all queries at once."""
    B, HQ, T, D = q.shape
    HKV, MC = ck.shape[1], ck.shape[2]
    G, C = HQ // HKV, MC - num_memory
    scale = D ** -0.5 if scale is None else scale
    logits = torch.matmul(q.view(B, HKV, G, T, D), ck[:, :, None].transpose(-1, -2)) * scale
    if causal:
        query_pos = torch.arange(query_offset, query_offset + T, device=q.device)
        visible = compressed_visibility(query_pos, C, stride)
        visible = torch.cat((torch.ones(T, num_memory, dtype=torch.bool, device=q.device), visible), dim=-1)
        logits = logits.masked_fill(~visible, masked_score(logits.dtype))
    attn = logits.softmax(dim=-1)  # invisible blocks weigh exactly 0 (their logit is finite and tiny)
    out = weighted_values(attn, cv[:, :, None]).reshape(B, HQ, T, cv.shape[-1])
    scores = logits[..., num_memory:].reshape(B, HQ, T, C)
    return out, scores


def compressed_attention_chunked(q: Tensor, ck: Tensor, cv: Tensor, num_memory: int, stride: int, causal: bool = True,
                                 scale: float | None = None, query_offset: int = 0) -> Tensor:
    """The output of `compressed_attention_reference` over chunks of queries (re-computed in the
    backward pass), so the (T x C) logits exist one chunk at a time: memory linear in T."""
    B, HQ, T, _ = q.shape
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, ck, cv))

    def part(start: int, end: int) -> Tensor:
        return compressed_attention_reference(q[:, :, start:end], ck, cv, num_memory, stride, causal, scale,
                                              query_offset=query_offset + start)[0]

    chunk = query_chunk_size(T, ck.shape[-2], HQ, B, budget=1 << 24)
    return map_query_chunks(part, T, chunk, needs_grad)


def compressed_scores(q: Tensor, ck: Tensor, stride: int, causal: bool, scale: float, query_pos: Tensor) -> Tensor:
    """Scaled logits (B, HQ, T, C) of the queries at `query_pos` ((T,) or per row (B, T)) against the
    compressed keys ck (B, HKV, C, D) (no memory tokens); invisible blocks hold `masked_score`."""
    B, HQ, T, D = q.shape
    HKV, C = ck.shape[1], ck.shape[2]
    logits = torch.matmul(q.view(B, HKV, HQ // HKV, T, D), ck[:, :, None].transpose(-1, -2)) * scale
    logits = logits.reshape(B, HQ, T, C)
    if causal:
        logits = logits.masked_fill(~compressed_visibility(query_pos, C, stride), masked_score(logits.dtype))
    return logits
