"""Rotary embedding as one Triton pass (forward: rotate; backward: rotate back), with autograd.

The PyTorch twin is `nsa_core.rotary.apply_rotary`: it makes float32 copies of the whole input
(a 64-head, 64k-token bf16 q is 1 GiB, ~6 GiB in float32); the kernel reads and writes each
element once. Same arithmetic: pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) in float32
(float64 for float64 inputs), from the same cos / sin tables.

Dimension legend: B batch, H heads, N tokens, D head dim, P = rotated pairs (2P <= D; the
features past 2P pass through unchanged).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_core.kernels import outputs

BLOCK_TOKENS = 32


@triton.jit
def rotary_kernel(
    X, COS, SIN, OUT,
    N, H,
    stride_xb, stride_xh, stride_xn,
    stride_ob, stride_oh, stride_on,
    PAIRS: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_REST: tl.constexpr,
    BLOCK_N: tl.constexpr, INVERSE: tl.constexpr,
):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pairs = tl.arange(0, BLOCK_P)
    mask = (tokens < N)[:, None] & (pairs < PAIRS)[None, :]
    x_row = X + b * stride_xb + h * stride_xh + tokens[:, None] * stride_xn
    o_row = OUT + b * stride_ob + h * stride_oh + tokens[:, None] * stride_on
    table = tokens[:, None] * PAIRS + pairs[None, :]
    cos = tl.load(COS + table, mask=mask, other=0.0)
    sin = tl.load(SIN + table, mask=mask, other=0.0)
    if INVERSE:
        sin = -sin
    x0 = tl.load(x_row + 2 * pairs[None, :], mask=mask, other=0.0).to(cos.dtype)
    x1 = tl.load(x_row + 2 * pairs[None, :] + 1, mask=mask, other=0.0).to(cos.dtype)
    out_dtype = OUT.dtype.element_ty
    tl.store(o_row + 2 * pairs[None, :], (x0 * cos - x1 * sin).to(out_dtype), mask=mask)
    tl.store(o_row + 2 * pairs[None, :] + 1, (x1 * cos + x0 * sin).to(out_dtype), mask=mask)
    if BLOCK_REST > 0:  # features past the rotated ones pass through
        rest = 2 * PAIRS + tl.arange(0, BLOCK_REST)
        rest_mask = (tokens < N)[:, None] & (rest < D)[None, :]
        tl.store(o_row + rest[None, :], tl.load(x_row + rest[None, :], mask=rest_mask), mask=rest_mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x (..., N, D) with unit stride on D; cos / sin (N, P) contiguous -> rotated x, contiguous."""
    N, D = x.shape[-2], x.shape[-1]
    P = cos.shape[-1]
    x4 = x.reshape(-1, 1, N, D) if x.ndim != 4 else x
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    B, H = x4.shape[0], x4.shape[1]
    out = outputs.new_output(B, H, N, D, device=x.device, dtype=x.dtype)
    rest = D - 2 * P
    grid = (triton.cdiv(N, BLOCK_TOKENS), B * H)
    if N > 0 and B * H > 0:
        rotary_kernel[grid](
            x4, cos, sin, out, N, H,
            x4.stride(0), x4.stride(1), x4.stride(2), out.stride(0), out.stride(1), out.stride(2),
            PAIRS=P, D=D, BLOCK_P=triton.next_power_of_2(max(P, 1)),
            BLOCK_REST=triton.next_power_of_2(rest) if rest > 0 else 0, BLOCK_N=BLOCK_TOKENS, INVERSE=inverse,
        )
    return out.view(x.shape)


class RotaryKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, sin, inverse=True), None, None


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return RotaryKernel.apply(x, cos.contiguous(), sin.contiguous())
