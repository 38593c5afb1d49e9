"""Interval masks on FlexAttention: every query sees a prefix of P keys and one interval [lo, hi) of
the others (packed documents: a document's keys up to the query, or its compressed slots).

The mask is a `mask_mod` over two per-query tensors (lo, hi), and the `BlockMask` is built straight
from them (`BlockMask.from_kv_blocks`): a (query tile, key tile) pair is attended when the tile's
keys meet the prefix or the hull of its queries' intervals, and full (no mask_mod) when every query
of the tile sees every key of it. Nothing of size queries x keys is ever made (the tiles are
(T / 128) x (K / 128) booleans) and nothing is read on the host.

On CUDA the call is `torch.compile(flex_attention)`, as torch's docs have it: the first row length
compiles a static kernel, a second one a dynamic-shape kernel that serves every later length (with
`dynamic=False` every length would recompile, and past torch's recompile limit flex would fall back
to its eager form, which materializes the scores). On CPU FlexAttention runs eagerly, forward only
(PyTorch has no CPU backward for it): a CPU call that needs gradients is an unsupported input
(`flex_unsupported_reason`).

Dimension legend: B batch (1 for packed rows), HQ query heads, HKV kv heads, T queries,
K keys (P prefix keys first), D / Dv head dims, NQ / NK query / key tiles of TILE tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from nsa_core.kernels.limits import dtype_reason, head_dim_reason

TILE = 128  # FlexAttention's default sparse block size, for queries and keys
_COMPILED: Callable | None = None


def flex_unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why FlexAttention cannot take these inputs here (None if it can)."""
    reason = dtype_reason(q) or head_dim_reason(q.shape[-1], v.shape[-1])
    if reason is not None:
        return reason
    if q.device.type == "cuda" and min(q.shape[-1], v.shape[-1]) < 16:
        return f"FlexAttention on CUDA takes head dims >= 16, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    group = q.shape[1] // k.shape[1]
    if q.device.type == "cuda" and q.shape[-2] < TILE and group & (group - 1):
        return f"FlexAttention's kernel for fewer than {TILE} queries takes power-of-two query groups, got {group}"
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "FlexAttention has no backward on CPU"
    return None


def interval_mask_mod(lo: Tensor, hi: Tensor, num_prefix: int, tokens_per_row: int = 1,
                      heads: int = 1) -> Callable:
    """mask_mod: key kv is visible to query token t when kv < num_prefix or lo[t] <= kv < hi[t].
    tokens_per_row r > 1: the row layout of kernels/compressed_flex.py, query row q_idx of head h holds token
    q_idx * r + h // heads; lo / hi must then cover every row's r tokens (padded, seeing nothing)."""
    if tokens_per_row == 1:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < num_prefix) | ((kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx]))
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            token = q_idx * tokens_per_row + h // heads
            return (kv_idx < num_prefix) | ((kv_idx >= lo[token]) & (kv_idx < hi[token]))

    return mask_mod


def interval_block_mask(lo: Tensor, hi: Tensor, num_prefix: int, kv_len: int, tokens_per_row: int = 1,
                        heads: int = 1):
    """The BlockMask of `interval_mask_mod(lo, hi, num_prefix, tokens_per_row, heads)` for lo, hi (T,)
    int over kv_len keys (one mask for all heads: a tile of TILE rows covers their TILE * r tokens).
    Conservative where it must be: a tile is full only when all its tokens exist and see all its
    TILE keys (torch's own rule for ragged ends)."""
    from torch.nn.attention.flex_attention import BlockMask

    T, device, r = lo.shape[0], lo.device, tokens_per_row
    rows = -(-T // r)
    nq, nk = -(-rows // TILE), -(-kv_len // TILE)
    lo, hi = _pad_to_tiles(lo, hi, nq * TILE * r, kv_len)
    lo_t, hi_t = lo.view(nq, TILE * r), hi.view(nq, TILE * r)
    empty = lo_t >= hi_t  # padded queries are empty intervals too
    hull_lo = torch.where(empty, kv_len, lo_t).amin(-1, keepdim=True)  # (NQ, 1)
    hull_hi = torch.where(empty, 0, hi_t).amax(-1, keepdim=True)
    k0 = torch.arange(nk, device=device) * TILE  # (NK,) first key of each tile
    k1 = k0 + TILE
    touched = (k0 < num_prefix) | ((k0 < hull_hi) & (k1 > hull_lo))  # (NQ, NK)
    full = (k1 <= num_prefix) | ((k0 >= lo_t.amax(-1, keepdim=True)) & (k1 <= hi_t.amin(-1, keepdim=True)))
    full = full & (k1 <= kv_len) & (torch.arange(1, nq + 1, device=device) * TILE * r <= T)[:, None]
    partial = touched & ~full
    counts, indices = zip(*(_ordered(flags) for flags in (partial, full)))
    return BlockMask.from_kv_blocks(counts[0], indices[0], counts[1], indices[1], BLOCK_SIZE=TILE,
                                    mask_mod=interval_mask_mod(lo, hi, num_prefix, r, heads),
                                    seq_lengths=(rows, kv_len))


def flex(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float) -> Tensor:
    """q (B, HQ, T, D), k (B, HKV, K, D), v (B, HKV, K, Dv) -> (B, HQ, T, Dv): compiled on CUDA, eager on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    if q.device.type == "cpu" and not torch.is_grad_enabled():  # flex refuses CPU leaves needing gradients
        q, k, v = q.detach(), k.detach(), v.detach()
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def interval_attention(q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, num_prefix: int,
                       scale: float) -> Tensor:
    """Attention of q over k / v where query t sees keys [0, num_prefix) and [lo[t], hi[t]) -> (B, HQ, T, Dv).
    Every query must see at least one key."""
    if q.shape[-2] == 0:
        return q.new_empty(*q.shape[:-1], v.shape[-1])
    return flex(q, k, v, interval_block_mask(lo, hi, num_prefix, k.shape[-2]), scale)


def _compiled_flex() -> Callable:
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention)
    return _COMPILED


def _pad_to_tiles(lo: Tensor, hi: Tensor, length: int, kv_len: int) -> tuple[Tensor, Tensor]:
    """lo, hi (T,) -> int32 (length,), the padded queries seeing nothing (lo = kv_len, hi = 0)."""
    pad = length - lo.shape[0]
    lo, hi = lo.to(torch.int32), hi.to(torch.int32)
    if pad:
        lo = torch.cat((lo, lo.new_full((pad,), kv_len)))
        hi = torch.cat((hi, hi.new_zeros(pad)))
    return lo, hi


def _ordered(flags: Tensor) -> tuple[Tensor, Tensor]:
    """(NQ, NK) bool -> counts (1, 1, NQ) and the flagged tiles first, ascending, (1, 1, NQ, NK), int32."""
    counts = flags.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]
