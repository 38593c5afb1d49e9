"""Reference selected-block attention (the fine branch of NSA). Queries may sit after cached keys
(q_offset): query i is at key position q_offset + i.

Each query gathers the keys of its selected blocks (and, when causal, of its own block), so time
and memory are linear in the sequence (per query (S + 1) x block keys), over chunks of queries.
Semantics: a block counts once however many valid slots name it, its logits multiplied by the sum
of those slots' gates; when causal the own block is always attended (gate 1 unless selected too)
and no key after the query is; `window` also hides keys more than `window` positions back.

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV query heads per kv head,
HI heads of the selection (HKV or HQ), T queries, N keys, S selected slots per query (S' with the
own block), BS block size, L = S' x BS gathered keys per query, D / Dv head dims, c a chunk.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nsa_core.reference.masked_softmax import map_query_chunks, masked_softmax, poison, query_chunk_size, split_non_finite


def _dedupe(idx: Tensor, valid: Tensor, gates: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(keep, summed gates) per slot: a slot is kept when valid and no earlier valid slot names its
    block; a kept slot's gate is the sum over the valid slots naming its block."""
    same = (idx[..., :, None] == idx[..., None, :]) & valid[..., None, :] & valid[..., :, None]  # (.., S, S)
    S = idx.shape[-1]
    earlier = torch.ones(S, S, dtype=torch.bool, device=idx.device).tril(-1)
    keep = valid & ~(same & earlier).any(dim=-1)
    summed = None if gates is None else torch.matmul(same.to(gates.dtype), gates[..., None]).squeeze(-1)
    return keep, summed


def selected_attention_reference(
    q: Tensor,  # (B, HQ, T, D)
    k: Tensor,  # (B, HKV, N, D)
    v: Tensor,  # (B, HKV, N, Dv)
    indices: Tensor,  # (B, HI, T, S) integer
    block_size: int,
    valid: Tensor | None = None,  # (B, HI, T, S) bool
    gates: Tensor | None = None,  # (B, HI, T, S) float
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    q_offset: int = 0,
) -> Tensor:
    B, HQ, T, D = q.shape
    HKV, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, HI = HQ // HKV, indices.shape[1]
    BS = block_size
    scale = D ** -0.5 if scale is None else scale
    num_blocks = max(1, math.ceil(N / BS))
    valid = torch.ones_like(indices, dtype=torch.bool) if valid is None else valid
    safe_idx = torch.where(valid, indices, torch.zeros_like(indices)).long().clamp(0, num_blocks - 1)
    # keys and values per head of the selection (repeated per query head when each head selects)
    k_sel, v_sel = (t if HI == HKV else t.repeat_interleave(G, dim=1) for t in (k, v))
    q_sel = q.view(B, HKV, G, T, D) if HI == HKV else q.view(B, HQ, 1, T, D)
    offsets = torch.arange(BS, device=q.device)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, gates))

    def chunk_fn(start: int, end: int) -> Tensor:
        c = end - start
        idx, val = safe_idx[:, :, start:end], valid[:, :, start:end]
        keep, mult = _dedupe(idx, val, None if gates is None else gates[:, :, start:end].to(q.dtype))
        q_pos = torch.arange(q_offset + start, q_offset + end, device=q.device)  # (c,)
        if causal:
            own = (q_pos // BS).view(1, 1, c, 1).expand(B, HI, c, 1)
            own_selected = ((idx == own) & keep).any(dim=-1, keepdim=True)
            idx, keep = torch.cat((idx, own), dim=-1), torch.cat((keep, ~own_selected), dim=-1)
            if mult is not None:
                mult = torch.cat((mult, torch.ones_like(mult[..., :1])), dim=-1)
        key_pos = (idx[..., None] * BS + offsets).flatten(-2)  # (B, HI, c, L)
        allowed = keep.repeat_interleave(BS, dim=-1) & (key_pos < N)
        if causal:
            allowed = allowed & (key_pos <= q_pos[:, None])
        if window is not None:
            allowed = allowed & (key_pos >= q_pos[:, None] - window)
        gather = key_pos.clamp(max=N - 1).flatten(2)  # (B, HI, c * L)
        keys = k_sel.gather(2, gather[..., None].expand(-1, -1, -1, D)).view(B, HI, c, -1, D)
        values = v_sel.gather(2, gather[..., None].expand(-1, -1, -1, Dv)).view(B, HI, c, -1, Dv)
        logits = torch.einsum("bhgcd,bhcld->bhgcl", q_sel[:, :, :, start:end], keys) * scale
        if mult is not None:
            logits = logits * mult.repeat_interleave(BS, dim=-1)[:, :, None]
        weights = masked_softmax(logits, allowed[:, :, None])
        values, bad = split_non_finite(values)  # a non-finite value reaches only the rows that weigh it
        reached = ((weights != 0) & bad[:, :, None]).any(dim=-1)
        out = poison(torch.einsum("bhgcl,bhcld->bhgcd", weights, values), reached)
        return out.reshape(B, HQ, c, Dv)

    per_query = (safe_idx.shape[-1] + 1) * BS * max(D, Dv)  # gathered key / value elements per query and head
    chunk = query_chunk_size(T, per_query, HI, B)
    return map_query_chunks(chunk_fn, T, chunk, needs_grad)
