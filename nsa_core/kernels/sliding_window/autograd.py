"""torch.library registration of the sliding-window kernels, with autograd and fake (meta)
implementations, so torch.compile(fullgraph=True) traces through them and opcheck passes."""

from __future__ import annotations

import torch
from typing import Optional

from torch import Tensor

from nsa_core.kernels.sliding_window.launch import sliding_window_bwd, sliding_window_fwd


@torch.library.custom_op("nsa::sliding_window_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, q_offset: int,
         first: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return sliding_window_fwd(q, k, v, window, scale, q_offset, first)


@_fwd.register_fake
def _fwd_fake(q, k, v, window, scale, q_offset, first=None):
    B, HQ, T, _ = q.shape
    return q.new_empty(B, HQ, T, v.shape[-1]), q.new_empty(B, HQ, T, dtype=torch.float32)


@torch.library.custom_op("nsa::sliding_window_bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, window: int,
         scale: float, q_offset: int, first: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return sliding_window_bwd(do, q, k, v, o, lse, window, scale, q_offset, first)


@_bwd.register_fake
def _bwd_fake(do, q, k, v, o, lse, window, scale, q_offset, first=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, window, scale, q_offset, first = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, first)
    ctx.window, ctx.scale, ctx.q_offset = window, scale, q_offset


def _backward(ctx, do, dlse):
    q, k, v, o, lse, first = ctx.saved_tensors
    dq, dk, dv = _bwd(do.contiguous(), q, k, v, o, lse, ctx.window, ctx.scale, ctx.q_offset, first)
    return dq, dk, dv, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def sliding_window_triton(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None,
                          q_offset: int = 0, first: Tensor | None = None) -> Tensor:
    """Kernel path of nsa_core.sliding_window_attention (causal; inputs already validated): query row m
    at key position q_offset + m. first: packed documents (batch 1), the first token (T,) of each
    token's document."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    first = None if first is None else first.contiguous()
    o, _ = _fwd(q.contiguous(), k.contiguous(), v.contiguous(), int(window), scale, int(q_offset), first)
    return o
