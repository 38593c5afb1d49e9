"""Fast selected-block attention (the fast path; semantics of reference/selected_attention.py).

Queries are cut into chunks of c. A chunk's keys are the union of the blocks its queries name
(their valid slots, plus the own block when causal): found by sorting the chunk's c x S' block
ids, their blocks copied once per chunk, and attended under a (c x union keys) mask saying which query
named which block (with the causal cut, the window and the sequence end). All chunks of a group
go through one batched masked SDPA call; time and memory linear in T. When a chunk's union would
hold every block (short rows, wide selections) and the row is causal, a few query chunks instead
attend, one SDPA call each, the keys up to their last query under a block mask (the staircase:
no block copies, about half the keys of one call over all).

Gates: the fast path takes gates that multiply all of a query's kept blocks alike (a per-row
factor, folded into the query) and need no gradient: what the non-causal fine branch passes
(ones, or zeros for a query with no valid slot). Per-block or differentiable gates
(use_diff_topk) stay on the loop reference (`fast_selected_reason`).

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, HI heads of the selection
(HKV or HQ), GI = HQ / HI query heads per selection head, T queries, N keys, NB key blocks,
S slots (S' with the own block), BS block size, nc chunks, c queries per chunk, U union blocks of a
chunk, K = U x BS its keys, D / Dv head dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_core.reference.fast_masked import chunk_group, clean_keys, groups, masked_sdpa
from nsa_core.reference.selected_attention import _dedupe

CHUNKS = (8, 16, 32, 64, 128, 256)
GROUP_BUDGET = 1 << 24  # elements of one group's copied keys, values and masks (64 MB in float32)


def row_factors(indices: Tensor, valid: Tensor, gates: Tensor, causal: bool) -> Tensor | None:
    """(B, HI, T) per-query gate factor when every kept block of a query has the same summed gate
    (and, when causal, that gate is 1, the own block's), else None. Reads the gates on the host."""
    keep, summed = _dedupe(indices, valid, gates)
    first = torch.where(keep, summed, -math.inf).amax(dim=-1, keepdim=True)
    first = torch.where(keep.any(dim=-1, keepdim=True), first, torch.ones_like(first))
    same = torch.where(keep, summed == (1 if causal else first), True).all()
    return first[..., 0] if bool(same) else None


def fast_selected_reason(gates: Tensor | None) -> str | None:
    """Why these gates cannot take the fast path (None when they can, subject to row_factors)."""
    if gates is not None and gates.requires_grad and torch.is_grad_enabled():
        return "differentiable gates (use_diff_topk) run on the loop reference"
    return None


def selected_chunk(G: int, S1: int, BS: int, num_blocks: int, seq_len: int) -> int:
    """Queries per chunk minimizing a cost model of the batched call: per query, (rows of the call
    + overhead) x (union keys + overhead) / c, the union bounded by c x S' blocks and all blocks."""
    def cost(c: int) -> float:
        return (G * c + 16) * (min(num_blocks, c * S1) * BS + 16) / c

    best = min(CHUNKS, key=cost)
    return max(1, min(best, seq_len))


def selected_attention_fast(
    q: Tensor,  # (B, HQ, T, D)
    k: Tensor,  # (B, HKV, N, D)
    v: Tensor,  # (B, HKV, N, Dv)
    indices: Tensor,  # (B, HI, T, S) integer
    block_size: int,
    valid: Tensor | None = None,  # (B, HI, T, S) bool
    factors: Tensor | None = None,  # (B, HI, T) per-query gate factor (row_factors), None = 1
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    q_offset: int = 0,
) -> Tensor:
    B, HQ, T, D = q.shape
    HKV, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    HI, S = indices.shape[1], indices.shape[-1]
    GI, BS = HQ // HI, block_size
    scale = D ** -0.5 if scale is None else scale
    num_blocks = max(1, math.ceil(N / BS))
    dev = q.device
    valid = torch.ones_like(indices, dtype=torch.bool) if valid is None else valid
    ids = torch.where(valid, indices.long().clamp(0, num_blocks - 1), num_blocks)  # invalid: sentinel block
    q_pos_all = q_offset + torch.arange(T, device=dev)
    if causal:  # the own block, always attended (so no row is empty)
        own = (q_pos_all // BS).view(1, 1, T, 1).expand(B, HI, T, 1)
        ids, empty = torch.cat((ids, own), dim=-1), None
    else:  # a query with no valid slot gives zeros: it attends block 0 in the call, then is zeroed
        empty = ~valid.any(dim=-1)  # (B, HI, T)
        ids = torch.where(empty[..., None] & (torch.arange(S, device=dev) == 0), 0, ids)
    S1 = ids.shape[-1]
    k, v, bad = clean_keys(k, v)
    if HI != HKV:  # every query head selects: keys per query head
        k, v, bad = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v, bad))
    if factors is not None:
        q = q * factors.repeat_interleave(GI, dim=1)[..., None].to(q.dtype)
    qg = q.view(B, HI, GI, T, D)
    c = selected_chunk(GI, S1, BS, num_blocks, T)
    if causal and c * S1 >= num_blocks:  # a chunk's union would be every block
        return block_masked_staircase(qg, k, v, bad, ids, BS, scale, window, q_offset)
    # keys and values as rows of whole blocks (zero keys pad the last one; masked, being past N)
    k_blocks, v_blocks = (F.pad(t, (0, 0, 0, num_blocks * BS - N)).reshape(B * HI * num_blocks, -1) for t in (k, v))
    heads = torch.arange(B * HI, device=dev).view(B, HI, 1, 1)
    # per block: does it hold a non-finite key; per position: non-finite keys before it
    bad_block = F.pad(bad, (0, num_blocks * BS - N)).view(B, HI, num_blocks, BS).any(dim=-1)
    bad_before = F.pad(bad.cumsum(dim=-1), (1, 0))  # (B, HI, N + 1)
    offsets = torch.arange(BS, device=dev)
    K_chunk = min(num_blocks, c * S1) * BS  # union keys of a chunk, at most
    # per query: its share of the chunk's copied keys and values, its mask row (and SDPA's float copy of it)
    group = chunk_group(T, c, B * HI * K_chunk * (D + Dv) // c + 2 * B * HQ * K_chunk + B * HI * S1 * 4,
                        budget=GROUP_BUDGET)
    spans = groups(T, group)
    # split, not sliced: the backward pass joins the groups' gradients once (a slice's gradient is a
    # zero tensor of q's size per group)
    q_groups = qg.split([end - start for start, end in spans], dim=-2)
    parts = []
    for (start, end), q_group in zip(spans, q_groups):
        nc = -(-(end - start) // c)
        pad = nc * c - (end - start)
        rows = F.pad(ids[:, :, start:end], (0, 0, 0, pad), value=num_blocks)
        if pad:  # padding queries attend block 0 (never empty); their outputs are dropped
            rows[:, :, end - start:, 0] = 0
        cid = rows.view(B, HI, nc, c * S1)
        # the union of each chunk's blocks: sorted ids, first occurrences kept, compacted to the front
        srt = cid.sort(dim=-1).values
        first = torch.ones_like(srt, dtype=torch.bool)
        first[..., 1:] = srt[..., 1:] != srt[..., :-1]
        first = first & (srt < num_blocks)
        U = max(1, int(first.sum(dim=-1).max()))
        union = torch.where(first, srt, num_blocks).sort(dim=-1).values[..., :U]
        union = torch.where(union < num_blocks, union, -1)  # (B, HI, nc, U), -1: an empty slot
        named = (rows.view(B, HI, nc, c, S1, 1) == union.view(B, HI, nc, 1, 1, U)).any(dim=-2)  # (B, HI, nc, c, U)
        key_pos = (union[..., None] * BS + offsets).flatten(-2)  # (B, HI, nc, K)
        q_pos = (q_offset + start + torch.arange(nc * c, device=dev)).view(nc, c, 1)
        limit = q_pos if causal else N - 1  # causal: no later key (nor past the end, q_pos < N)
        allowed = named.repeat_interleave(BS, dim=-1) & (key_pos[..., None, :] <= limit)
        if window is not None:
            allowed = allowed & (key_pos[..., None, :] >= q_pos - window)
        # a query is poisoned by a non-finite key it sees: whole blocks before its own block, and
        # the keys of its own block up to itself
        seen_bad = named & (bad_block.gather(2, union.clamp(min=0).flatten(2)).view(B, HI, nc, 1, U) & (union >= 0)[..., None, :])
        gather = key_pos.clamp(0, N - 1).flatten(2)  # (B, HI, nc * K)
        K = key_pos.shape[-1]
        if window is not None:
            reached = (allowed & bad.gather(2, gather).view(B, HI, nc, 1, K)).any(dim=-1)
        elif causal:
            own_block = (q_pos // BS)  # (nc, c, 1)
            reached = (seen_bad & (union[..., None, :] < own_block)).any(dim=-1)
            own_first = (own_block * BS).view(-1)
            hi = (q_pos.view(-1) + 1).clamp(max=N)
            own_bad = bad_before[:, :, hi] - bad_before[:, :, own_first.clamp(max=N)] > 0
            reached = reached | own_bad.view(B, HI, nc, c)
        else:
            reached = seen_bad.any(dim=-1)
        rows_of = (heads * num_blocks + union.clamp(min=0)).flatten()  # whole blocks: contiguous rows
        kc = k_blocks.index_select(0, rows_of).view(B * HI * nc, 1, K, D)
        vc = v_blocks.index_select(0, rows_of).view(B * HI * nc, 1, K, Dv)
        qc = F.pad(q_group, (0, 0, 0, pad)).view(B, HI, GI, nc, c, D).transpose(2, 3)
        rowwise = lambda t: t.reshape(B * HI * nc, 1, c, *t.shape[4:])
        chunk_empty = False
        if empty is not None:
            chunk_empty = rowwise(F.pad(empty[:, :, start:end], (0, pad)).view(B, HI, nc, c))
        out = masked_sdpa(qc.reshape(B * HI * nc, GI, c, D), kc, vc, rowwise(allowed), scale, rowwise(reached),
                          empty=chunk_empty if window is None else None)  # (B * HI * nc, GI, c, Dv)
        out = out.view(B, HI, nc, GI, c, Dv).transpose(2, 3).reshape(B, HQ, nc * c, Dv)
        parts.append(out[:, :, : end - start])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


STAIRCASE_STEPS = 8  # query chunks of the causal staircase: the computed keys are ~ (1 + 1 / 8) / 2 of all


def block_masked_staircase(qg: Tensor, k: Tensor, v: Tensor, bad: Tensor, ids: Tensor, block_size: int, scale: float,
                           window: int | None, q_offset: int, budget: int = 1 << 24) -> Tensor:
    """Causal selected attention as dense attention under a block mask, for rows so short (or
    selections so wide) that a chunk's union would hold every block: a few query chunks, each one
    masked SDPA call over the keys up to its last query (no block copies). qg (B, HI, GI, T, D); k, v
    (B, HI, N, D / Dv) with non-finite rows zeroed, `bad` (B, HI, N) those rows; ids (B, HI, T, S')
    the named blocks with the own block (invalid slots: an id past the last block)."""
    B, HI, GI, T, D = qg.shape
    N, Dv, BS = k.shape[2], v.shape[-1], block_size
    dev = qg.device
    chunk = max(1, min(-(-T // STAIRCASE_STEPS), budget // max(1, B * HI * (GI + 1) * N)))
    parts = []
    for start, qc in zip(range(0, T, chunk), qg.split(chunk, dim=-2)):  # split, not sliced: one join backward
        c = qc.shape[-2]
        K = min(N, q_offset + start + c)  # causal: no key after the chunk's last query
        nb = -(-K // BS)
        named = torch.zeros(B, HI, c, nb + 1, dtype=torch.bool, device=dev)
        named.scatter_(-1, ids[:, :, start : start + c].clamp(max=nb), True)  # ids past the keys: a spare column
        q_pos = (q_offset + start + torch.arange(c, device=dev))[:, None]  # (c, 1)
        key_pos = torch.arange(K, device=dev)
        allowed = named[..., :nb].repeat_interleave(BS, dim=-1)[..., :K] & (key_pos <= q_pos)  # (B, HI, c, K)
        if window is not None:
            allowed = allowed & (key_pos >= q_pos - window)
        reached = (allowed & bad[:, :, None, :K]).any(dim=-1)  # a non-finite key it sees: the row is NaN
        rows = lambda t: t.reshape(B * HI, 1, *t.shape[2:])
        out = masked_sdpa(qc.reshape(B * HI, GI, c, D), rows(k[:, :, :K]), rows(v[:, :, :K]), rows(allowed), scale,
                          rows(reached), empty=False)  # every row sees itself
        parts.append(out.view(B, HI * GI, c, Dv))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
