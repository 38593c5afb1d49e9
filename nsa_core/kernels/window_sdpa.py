"""The causal sliding window on PyTorch's fused attention (cuDNN SDPA): the band of a plain batch as two causal
calls over chunks of `window` queries, merged by their log-sum-exp.

Query t sees the keys t - W ... t (W = window, W + 1 keys). Cut the tokens into chunks of W; query i of chunk c
(t = cW + i) sees the keys of its own chunk up to itself (top-left causal over the chunk: piece 1) and the keys
of chunk c - 1 at offsets j >= i (an upper triangle: piece 2). Reversing both the queries and the keys of piece 2
(i' = W - 1 - i, j' = W - 1 - j) makes it top-left causal too, so both pieces are causal attention over W x W
tiles batched over the chunks, the shape cuDNN's fused kernels run at full speed. Chunk 0 has no piece 2. The
merge and the backward are split_staircase's: each piece's own backward, given the merged out and lse.

Memory: piece 2's reversed queries are rebuilt in the backward rather than saved (no activation beyond q, k, v,
the output and its lse). `math_partial` is the PyTorch twin of the pieces (tests on the CPU).

Dimension legend: B batch, H query heads, HK kv heads (H = G * HK), T tokens, N chunks (T padded to N * W),
W window = chunk length, D / Dv head dims; "chunked": (B * N, heads, W, dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .split_staircase import Partial, cudnn_partial, cudnn_split_runs

# rows of at least FROM_CHUNKS windows take the chunked cuDNN band (None: never); set from
# benchmarks/kernels/sliding_window.py's table (benchmarks/NOTES.md)
FROM_CHUNKS: int | None = None


def _chunked(t: Tensor, window: int) -> Tensor:
    """(B, heads, T, dim) -> (B * N, heads, W, dim), zero-padded at the end (a view where T = N * W and the
    tokens are the outer axis of t's memory, as a projection's (B, T, heads, dim) output is)."""
    B, heads, T, dim = t.shape
    chunks = -(-T // window)
    if chunks * window != T:
        t = F.pad(t, (0, 0, 0, chunks * window - T))
    return t.unflatten(2, (chunks, window)).transpose(1, 2).reshape(B * chunks, heads, window, dim)


def _unchunked(t: Tensor, batch: int, tokens: int) -> Tensor:
    """(B * N, heads, W, dim) -> (B, heads, T, dim)."""
    _, heads, window, dim = t.shape
    return t.unflatten(0, (batch, -1)).transpose(1, 2).reshape(batch, heads, -1, dim)[:, :, :tokens]


def _later(t: Tensor, batch: int) -> Tensor:
    """Chunks 1 ... N - 1 of every row, reversed along W: piece 2's queries (B * (N - 1), heads, W[, dim])."""
    return t.unflatten(0, (batch, -1))[:, 1:].flip(3).flatten(0, 1)


def _earlier(t: Tensor, batch: int) -> Tensor:
    """Chunks 0 ... N - 2 of every row, reversed along W: piece 2's keys."""
    return t.unflatten(0, (batch, -1))[:, :-1].flip(3).flatten(0, 1)


def _into_later(piece: Tensor, batch: int) -> Tensor:
    """Piece 2's per-query tensor (B * (N - 1), heads, W[, dim]) back to chunk order, zeros for chunk 0."""
    t = piece.unflatten(0, (batch, -1)).flip(3)
    return torch.cat([torch.zeros_like(t[:, :1]), t], dim=1).flatten(0, 1)


def _into_earlier(piece: Tensor, batch: int) -> Tensor:
    """Piece 2's per-key gradient back to chunk order, zeros for the last chunk."""
    t = piece.unflatten(0, (batch, -1)).flip(3)
    return torch.cat([t, torch.zeros_like(t[:, :1])], dim=1).flatten(0, 1)


class _ChunkedWindow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale, partial):
        B, T = q.shape[0], q.shape[2]
        qc, kc, vc = (_chunked(t, window) for t in (q, k, v))
        o1, l1, s1 = partial.forward(qc, kc, vc, True, scale)  # (B * N, H, W, Dv), (B * N, H, W)
        out, lse, s2 = torch.empty_like(o1), l1, None
        if qc.shape[0] > B:  # some row has a chunk 1
            o2, l2, s2 = partial.forward(_later(qc, B), _earlier(kc, B), _earlier(vc, B), True, scale)
            l2 = _into_later(l2, B).masked_fill_(_first_chunks(l1, B), float("-inf"))
            lse = torch.logaddexp(l1, l2)
            w1 = torch.exp(l1 - lse).unsqueeze(-1)
            wide = torch.promote_types(o1.dtype, torch.float32)  # half-precision pieces merge in float32
            out.copy_(o1.to(wide) * w1 + _into_later(o2, B).to(wide) * (1 - w1))
        else:
            out.copy_(o1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.scale, ctx.partial, ctx.states = window, scale, partial, (s1, s2)
        return _unchunked(out, B, T)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        window, scale, partial, (s1, s2) = ctx.window, ctx.scale, ctx.partial, ctx.states
        B, T = q.shape[0], q.shape[2]
        qc, kc, vc = (_chunked(t, window) for t in (q, k, v))
        dout_c = torch.empty_like(out).copy_(_chunked(dout, window))  # the pieces' own output layout
        dq, dk, dv = partial.backward(dout_c, qc, kc, vc, out, lse, s1, True, scale)
        if qc.shape[0] > B:
            count = qc.shape[0] - B  # piece 2's chunks; its out and dout in the pieces' output layout
            o2_like = lambda t: torch.empty_like(out[:count]).copy_(_later(t, B))  # noqa: E731
            dq2, dk2, dv2 = partial.backward(o2_like(dout_c), _later(qc, B), _earlier(kc, B), _earlier(vc, B),
                                             o2_like(out), _later(lse, B).contiguous(), s2, True, scale)
            dq = dq + _into_later(dq2, B)
            dk, dv = dk + _into_earlier(dk2, B), dv + _into_earlier(dv2, B)
        return (_unchunked(dq, B, T), _unchunked(dk, B, T), _unchunked(dv, B, T), None, None, None)


def _first_chunks(per_query: Tensor, batch: int) -> Tensor:
    """(B * N, ...) -> a bool mask of the same shape, True on every row's chunk 0 (no piece 2 there)."""
    mask = torch.zeros(batch, per_query.shape[0] // batch, dtype=torch.bool, device=per_query.device)
    mask[:, 0] = True
    return mask.flatten().view(-1, *([1] * (per_query.dim() - 1))).expand_as(per_query)


def chunked_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float,
                             partial: Partial = cudnn_partial) -> Tensor:
    """Causal sliding-window attention of a plain batch: q (B, H, T, D), k / v (B, HK, T, D / Dv), query t sees
    keys t - window ... t. -> (B, H, T, Dv) in q's dtype."""
    return _ChunkedWindow.apply(q, k, v, int(window), float(scale), partial)


def chunked_window_pays(q: Tensor, k: Tensor, v: Tensor, window: int) -> bool:
    """Whether a plain batch's band runs here rather than on the band kernels: cuDNN takes its chunks
    (half-precision CUDA tensors of a shape it supports), the row holds at least FROM_CHUNKS chunks, and no
    bit-reproducible run is asked for (torch.use_deterministic_algorithms: the band kernels are)."""
    if FROM_CHUNKS is None or q.shape[2] < FROM_CHUNKS * window or torch.are_deterministic_algorithms_enabled():
        return False
    probe = lambda t: t[:, :, :window]  # noqa: E731  (the chunks' shape; the batch does not matter to the check)
    return cudnn_split_runs(probe(q), probe(k), probe(v))
