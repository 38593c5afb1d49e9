"""delta = sum(dO * O, -1) in float32, the row statistic every attention backward starts from, as
one Triton pass over two contiguous tensors (no float32 copies of them)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_core.kernels import outputs

ROWS_PER_PROGRAM = 64


@triton.jit
def _row_dot_kernel(a, b, out, R, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    o_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # rows pass 2**31 elements
    o_d = tl.arange(0, BLOCK_D)
    m = (o_r[:, None] < R) & (o_d[None, :] < D)
    p = o_r[:, None] * D + o_d[None, :]
    b_a = tl.load(a + p, mask=m, other=0.0).to(tl.float32)
    b_b = tl.load(b + p, mask=m, other=0.0).to(tl.float32)
    tl.store(out + o_r, tl.sum(b_a * b_b, axis=1), mask=o_r < R)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) in float32 for a, b of one shape (..., D) -> (...) (copied if not contiguous)."""
    if a.shape != b.shape:
        raise ValueError(f"row_dot takes two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    D = a.shape[-1]
    out = outputs.new_output(*a.shape[:-1], device=a.device, dtype=torch.float32)
    R = out.numel()
    if R:
        _row_dot_kernel[(triton.cdiv(R, ROWS_PER_PROGRAM),)](a, b, out, R, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                                                              BLOCK_R=ROWS_PER_PROGRAM, num_warps=4)
    return out
