"""Fast sliding-window attention (the fast path; semantics of reference/sliding_window.py).

Queries are cut into chunks of c; chunk j sees one contiguous band of keys (c + window, or
c + 2 x window when not causal), unfolded from the padded keys, and all chunks go through one
batched masked SDPA call: time and memory linear in T.

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, T queries, S keys,
nc chunks, c queries per chunk, W band keys per chunk, D / Dv head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_core.reference.fast_masked import chunk_group, clean_keys, groups, masked_sdpa

GROUP_BUDGET = 1 << 24  # elements of one group's masks and key bands (64 MB in float32)


def window_chunk(window: int, seq_len: int) -> int:
    """Queries per chunk: about the window (the band then costs at most twice its keys), 32 ... 256."""
    c = 32
    while c < min(window, 256):
        c *= 2
    return max(1, min(c, seq_len))


def sliding_window_fast(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool = True,
                        scale: float | None = None, q_offset: int = 0) -> Tensor:
    B, HQ, T, D = q.shape
    HKV, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // HKV
    scale = D ** -0.5 if scale is None else scale
    c = window_chunk(window, T)
    W = c + (1 if causal else 2) * window
    k, v, bad = clean_keys(k, v)
    # bad keys before each position: a query is poisoned when its band holds one
    bad_before = F.pad(bad.cumsum(dim=-1), (1, 0))  # (B, HKV, S + 1)
    # per query: its mask row (and SDPA's float copy of it), its share of the band's keys and values
    group = chunk_group(T, c, 2 * B * HQ * W + B * HKV * W * (D + Dv) // c, budget=GROUP_BUDGET)
    spans = groups(T, group)
    # split, not sliced: the backward pass joins the groups' gradients once
    q_groups = q.split([end - start for start, end in spans], dim=-2)
    parts = []
    for (start, end), q_group in zip(spans, q_groups):
        nc = -(-(end - start) // c)
        first = q_offset + start  # key position of the group's first query
        lo = first - window  # key position of the first band key of chunk 0
        need = (nc - 1) * c + W  # key positions lo ... lo + need - 1
        pad_front, pad_back = max(0, -lo), max(0, lo + need - S)
        band = lambda t: F.pad(t[:, :, max(lo, 0) : lo + need], (0, 0, pad_front, pad_back))  # only the band copied
        kb = band(k).unfold(2, W, c).transpose(-1, -2)  # (B, HKV, nc, W, D)
        vb = band(v).unfold(2, W, c).transpose(-1, -2)
        q_pos = first + torch.arange(nc * c, device=q.device).view(nc, c)
        k_pos = lo + (torch.arange(nc, device=q.device) * c)[:, None] + torch.arange(W, device=q.device)  # (nc, W)
        dist = q_pos[:, :, None] - k_pos[:, None, :]
        allowed = (dist <= window) & ((dist >= 0) if causal else (dist >= -window))
        allowed = allowed & (k_pos >= 0)[:, None] & (k_pos < S)[:, None]  # (nc, c, W)
        qc = F.pad(q_group, (0, 0, 0, nc * c - (end - start)))
        qc = qc.view(B, HKV, G, nc, c, D).permute(0, 1, 3, 2, 4, 5).reshape(B, HKV, nc, G * c, D)
        mask = allowed[:, None].expand(nc, G, c, W).reshape(nc, G * c, W)
        hi = (q_pos + (0 if causal else window) + 1).clamp(0, S)
        lo_q = (q_pos - window).clamp(0, S)
        reached = (bad_before[:, :, hi.flatten()] - bad_before[:, :, lo_q.flatten()]) > 0  # (B, HKV, nc * c)
        reached = reached.view(B, HKV, nc, 1, c).expand(B, HKV, nc, G, c).reshape(B, HKV, nc, G * c)
        out = masked_sdpa(qc, kb, vb, mask, scale, reached)  # (B, HKV, nc, G * c, Dv)
        out = out.view(B, HKV, nc, G, c, Dv).permute(0, 1, 3, 2, 4, 5).reshape(B, HQ, nc * c, Dv)
        parts.append(out[:, :, : end - start])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
