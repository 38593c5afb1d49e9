"""The staircase of a late sequence-parallel shard as two attention calls merged by their
log-sum-exp: the compressed branch's fast path when the shard's first row sees many more keys
than the staircase has rows.

Rows r = 0 ... L - 1 of a shard's staircase see the keys 0 ... K0 + r (K0 = M + R0 - 1). Split at
K0: every row sees all of the rectangle 0 ... K0 - 1 (no mask) and the top-left causal triangle
K0 ... K0 + L - 1 of the rest. Both pieces are shapes cuDNN's fused attention runs at full speed,
where the lower-right masked call over the whole staircase runs on flash (half the speed per FLOP
on Hopper, benchmarks/NOTES.md). The merge: lse = logaddexp(lse1, lse2), out = sum_i out_i *
exp(lse_i - lse). Backward: each piece's own backward, given the merged out and lse, returns the
gradients of its keys and its share of dq (softmax over the union restricted to a piece is
exp(s - lse), and rowsum(dout * out) is the same for both pieces).

A piece is a `Partial`: forward (q, k, v, causal, scale) -> (out, lse, state) and backward (dout,
q, k, v, out, lse, state, causal, scale) -> (dq, dk, dv). `cudnn_partial` runs cuDNN's private SDPA
op (CUDA, half precision); `math_partial` is its PyTorch twin (any device, any dtype), used by the
tests to check the split, the merge and the backward against the reference.

Dimension legend: B batch, H query heads, HK kv heads (H = G * HK, query head h reads kv head
h // G), L rows, K1 / K2 keys of the rectangle / triangle, D / Dv head dims.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

aten = torch.ops.aten


class Partial(NamedTuple):
    forward: Callable[..., tuple[Tensor, Tensor, Any]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


def _cudnn_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
    outs = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    # outs: out, lse (B, H, L, 1) float32, cum_seq_q, cum_seq_k, max_q, max_k, philox seed, philox offset
    return outs[0], outs[1].reshape(q.shape[:3]), tuple(outs[2:8])


def _cudnn_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, state: Any,
                    causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    cum_q, cum_k, max_q, max_k, seed, offset = state
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale)


cudnn_partial = Partial(_cudnn_forward, _cudnn_backward)


def _grouped(t: Tensor, heads: int) -> Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def _masked_logits(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    s = (q @ _grouped(k, q.shape[1]).transpose(-1, -2)) * scale  # (B, H, L, K)
    if causal:  # top-left: row r sees keys 0 ... r
        L, K = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, K, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor, Any]:
    s = _masked_logits(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, L)
    return torch.exp(s - lse.unsqueeze(-1)) @ _grouped(v, q.shape[1]), lse, None


def _math_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, state: Any,
                   causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    H, HK = q.shape[1], k.shape[1]
    p = torch.exp(_masked_logits(q, k, causal, scale) - lse.unsqueeze(-1))  # this piece's share of the merged softmax
    dp = dout @ _grouped(v, H).transpose(-1, -2)
    ds = p * (dp - (dout * out).sum(-1, keepdim=True)) * scale
    dq = ds @ _grouped(k, H)
    dk, dv = ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ dout  # (B, H, K, D / Dv) per query head
    fold = lambda t: t.unflatten(1, (HK, H // HK)).sum(2)  # back to the kv heads
    return dq, fold(dk), fold(dv)


math_partial = Partial(_math_forward, _math_backward)


class _SplitStaircase(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_rect, v_rect, k_tri, v_tri, scale, partial):
        o1, l1, s1 = partial.forward(q, k_rect, v_rect, False, scale)
        o2, l2, s2 = partial.forward(q, k_tri, v_tri, True, scale)
        lse = torch.logaddexp(l1, l2)
        w1 = torch.exp(l1 - lse).unsqueeze(-1)
        wide = torch.promote_types(o1.dtype, torch.float32)  # half-precision pieces merge in float32
        merged = o1.to(wide) * w1 + o2.to(wide) * (1 - w1)
        out = torch.empty_like(o1)  # the pieces' own memory layout, as their backward expects
        out.copy_(merged)
        ctx.save_for_backward(q, k_rect, v_rect, k_tri, v_tri, out, lse)
        ctx.pieces, ctx.scale, ctx.partial = (s1, s2), scale, partial
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k_rect, v_rect, k_tri, v_tri, out, lse = ctx.saved_tensors
        (s1, s2), scale, partial = ctx.pieces, ctx.scale, ctx.partial
        if dout.stride() != out.stride():
            dout = torch.empty_like(out).copy_(dout)
        dq1, dk1, dv1 = partial.backward(dout, q, k_rect, v_rect, out, lse, s1, False, scale)
        dq2, dk2, dv2 = partial.backward(dout, q, k_tri, v_tri, out, lse, s2, True, scale)
        return dq1 + dq2, dk1, dv1, dk2, dv2, None, None


def split_staircase_attention(q: Tensor, k_rect: Tensor, v_rect: Tensor, k_tri: Tensor, v_tri: Tensor, scale: float,
                              partial: Partial = cudnn_partial) -> Tensor:
    """q (B, H, L, D); k_rect / v_rect (B, HK, K1, D / Dv) seen by every row; k_tri / v_tri (B, HK, K2, .)
    seen top-left causally (row r: keys 0 ... r). -> (B, H, L, Dv) in q's dtype."""
    return _SplitStaircase.apply(q, k_rect, v_rect, k_tri, v_tri, scale, partial)


def cudnn_split_runs(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether cuDNN's fused attention takes these (half-precision CUDA tensors it supports)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    return can_use_cudnn_attention(SDPAParams(q, k, v, None, 0.0, False, q.shape[1] != k.shape[1]))
