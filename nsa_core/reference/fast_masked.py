"""What the fast PyTorch path of every branch shares: one masked SDPA call with the reference's
edge rules (a row with no allowed key gives zeros; a non-finite key or value reaches only the rows
that allow it, and makes them NaN), and the choice of query chunk sizes.

The fast path (fast_selected.py, fast_window.py, fast_compressed.py) states each branch as dense
attention under a boolean mask built from block indices or positions, so the heavy work is
torch's fused scaled_dot_product_attention (no score matrix kept for the backward pass) instead of
per-query gathers. Its semantics are the loop reference's (selected_attention.py,
sliding_window.py, compressed_attention.py), which stays the twin it is tested against.

Dimension legend: R rows of attention (batch x heads x chunks, flattened), L queries per row,
K keys per row, D / Dv head dims, H kv heads, N keys of a sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clean_keys(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """k (..., N, D), v (..., N, Dv) -> (k, v with the rows of non-finite keys or values zeroed,
    bad (..., N) bool: those rows). A zeroed row is masked wherever it is not allowed, and the rows
    that allow it are set to NaN afterwards (masked_sdpa's `poisoned`)."""
    bad = ~(torch.isfinite(k).all(dim=-1) & torch.isfinite(v).all(dim=-1))
    return k.masked_fill(bad[..., None], 0.0), v.masked_fill(bad[..., None], 0.0), bad


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float,
                poisoned: Tensor | None = None, empty: Tensor | bool | None = None) -> Tensor:
    """q (R..., L, D), k (R..., K, D), v (R..., K, Dv), allowed bool broadcastable to (R..., L, K)
    (None: every key) -> (R..., L, Dv); with 4-D inputs k and v may have fewer heads than q (GQA).
    A row with no allowed key gives zeros (and no gradient); `poisoned` (broadcastable to (R..., L)):
    rows set to NaN. `empty`: the rows with no allowed key when the caller knows them (then every
    row must allow at least one key: a fully masked row makes NaN in the backward pass), False when
    there are none; None: found from `allowed`."""
    if allowed is not None and empty is None:
        empty = ~allowed.any(dim=-1)
        allowed = allowed | empty[..., None]
    out = _sdpa_4d(q, k, v, allowed, scale)
    if isinstance(empty, Tensor):
        out = out.masked_fill(empty[..., None], 0.0)
    if poisoned is not None:
        out = out.masked_fill(poisoned[..., None], float("nan"))
    return out


def _sdpa_4d(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float) -> Tensor:
    """SDPA with the leading dims merged down to 4-D: torch's fused CPU kernel takes only 4-D
    inputs and 2-D or 4-D masks (with more dims, or a 3-D mask, it falls back to the unfused math
    path, ~2-5x slower)."""
    if q.ndim <= 4:
        gqa = q.ndim == 4 and q.shape[1] != k.shape[1]
        if allowed is not None and allowed.ndim == 3:
            allowed = allowed[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    lead, L, K = q.shape[:-2], q.shape[-2], k.shape[-2]
    flat = lambda t: t.reshape(-1, lead[-1], *t.shape[-2:])
    if allowed is not None and allowed.ndim > 3:
        allowed = flat(allowed.expand(*lead, L, K))
    elif allowed is not None and allowed.ndim == 3:  # (lead[-1], L, K): broadcast over the merged dims
        allowed = allowed[None]
    out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=allowed, scale=scale)
    return out.view(*lead, L, v.shape[-1])


def chunk_group(seq_len: int, chunk: int, elements_per_query: int, budget: int = 1 << 24) -> int:
    """How many queries (a multiple of `chunk`) one vectorized pass takes, so that its masks and
    gathered keys stay under `budget` elements (memory linear in the sequence length)."""
    per_chunk = max(1, elements_per_query * chunk)
    chunks = max(1, budget // per_chunk)
    return min(chunks * chunk, -(-seq_len // chunk) * chunk)


def groups(seq_len: int, group: int) -> list[tuple[int, int]]:
    """(start, end) ranges of `group` queries covering seq_len."""
    return [(s, min(seq_len, s + group)) for s in range(0, seq_len, group)]
