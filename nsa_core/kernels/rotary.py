"""Rotary embedding as one Triton pass (forward: rotate; backward: rotate back), with autograd.

The PyTorch twin is `nsa_core.reference.rotary.rotary_reference`: it makes float32 copies of the whole input
(a 64-head, 64k-token bf16 q is 1 GiB, ~6 GiB in float32); the kernel reads and writes each
element once. Same arithmetic: pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) in float32
(float64 for float64 inputs), from the same cos / sin tables. `rotate_at_positions`: rows whose tokens sit
at their own positions (a decoding step), the angles computed in the kernel from the positions and the
frequencies (the twin builds the tables per row, as `RotaryEmbedding.tables` does).

Dimension legend: B batch, H heads, N tokens, D head dim, P = rotated pairs (2P <= D; the
features past 2P pass through unchanged).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_core.kernels.grid import split_pid

from nsa_core.kernels import outputs

BLOCK_TOKENS = 16
# heads per program of the positions kernel: a decoding step's q (64 heads, one token per row) took 29 us on an
# H200 at batch 16 with every head in one program per row
HEADS_PER_PROGRAM = 4


@triton.jit
def _rotate_heads(X, OUT, cos, sin, b, tokens, in_n, h_start, h_end, stride_xb, stride_xh, stride_xn, stride_ob, stride_oh, stride_on,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rotate the BLOCK_N tokens of row b in heads h_start ... h_end - 1 by (BLOCK_N, BLOCK_D // 2) pair tables."""
    dims = tl.arange(0, BLOCK_D)
    mask = in_n[:, None] & (dims < D)[None, :]
    out_dtype = OUT.dtype.element_ty
    for h in range(h_start, h_end):
        h = tl.cast(h, tl.int64)
        x = tl.load(X + b * stride_xb + h * stride_xh + tokens[:, None] * stride_xn + dims[None, :], mask=mask, other=0.0)
        x0, x1 = tl.split(tl.reshape(x.to(cos.dtype), (BLOCK_N, BLOCK_D // 2, 2)))
        out = tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), (BLOCK_N, BLOCK_D))
        tl.store(OUT + b * stride_ob + h * stride_oh + tokens[:, None] * stride_on + dims[None, :], out.to(out_dtype),
                 mask=mask)


@triton.jit
def rotary_kernel(
    X, COS, SIN, OUT,
    N, H,
    stride_xb, stride_xh, stride_xn,
    stride_ob, stride_oh, stride_on,
    PAIRS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, INVERSE: tl.constexpr,
):
    """One program per (token block, batch), looping over the heads: the cos / sin rows are read
    once, x and out move as whole contiguous rows (pairs split in registers). Pairs past PAIRS
    (and the odd last feature) get cos 1, sin 0: they pass through."""
    pid_n, b = split_pid(tl.cdiv(N, BLOCK_N))
    b = b.to(tl.int64)  # 64-bit offsets: a batch of 64-head, 64k-token tensors passes 2**31 elements
    # tokens x the token stride (heads x head dim in a projection's view) and heads x the head stride pass
    # 2**31 elements in one batch element at 1M tokens: 64-bit (a BLOCK_N vector, a scalar)
    tokens = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    pairs = tl.arange(0, BLOCK_D // 2)
    in_n = tokens < N
    table = tokens[:, None] * PAIRS + pairs[None, :]
    table_mask = in_n[:, None] & (pairs < PAIRS)[None, :]
    cos = tl.load(COS + table, mask=table_mask, other=1.0)
    sin = tl.load(SIN + table, mask=table_mask, other=0.0)
    if INVERSE:
        sin = -sin
    _rotate_heads(X, OUT, cos, sin, b, tokens, in_n, 0, H, stride_xb, stride_xh, stride_xn, stride_ob, stride_oh, stride_on,
                  D, BLOCK_D, BLOCK_N)


@triton.jit
def rotary_positions_kernel(
    X, POS, FREQS, OUT,
    N, H,
    stride_xb, stride_xh, stride_xn,
    stride_ob, stride_oh, stride_on, stride_pb, HEADS_PER_PROGRAM,
    PAIRS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, INVERSE: tl.constexpr,
):
    """As rotary_kernel, with every row's tokens at their own positions (POS (B, N) int64): the
    angles position x freqs and their cos / sin computed here, in FREQS' dtype, instead of read
    from tables (a decoding step: one launch instead of the tables' and the twin's dozen). Program axis 1:
    groups of HEADS_PER_PROGRAM heads (a step has one token per row: the heads give the parallelism)."""
    pid_n, b = split_pid(tl.cdiv(N, BLOCK_N))
    b = b.to(tl.int64)
    tokens = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    pairs = tl.arange(0, BLOCK_D // 2)
    in_n = tokens < N
    in_pairs = pairs < PAIRS
    freqs = tl.load(FREQS + pairs, mask=in_pairs, other=0.0)
    positions = tl.load(POS + b * stride_pb + tokens, mask=in_n, other=0)
    angles = positions.to(freqs.dtype)[:, None] * freqs[None, :]
    keep = in_n[:, None] & in_pairs[None, :]
    cos = tl.where(keep, tl.cos(angles), 1.0)
    sin = tl.where(keep, tl.sin(angles), 0.0)
    if INVERSE:
        sin = -sin
    h_start = tl.program_id(1) * HEADS_PER_PROGRAM
    _rotate_heads(X, OUT, cos, sin, b, tokens, in_n, h_start, tl.minimum(h_start + HEADS_PER_PROGRAM, H), stride_xb,
                  stride_xh, stride_xn, stride_ob, stride_oh, stride_on, D, BLOCK_D, BLOCK_N)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x (..., N, D) with unit stride on D; cos / sin (N, P) contiguous -> rotated x, contiguous."""
    N, D = x.shape[-2], x.shape[-1]
    P = cos.shape[-1]
    x4 = x.reshape(1, -1, N, D) if x.ndim != 4 else x  # other ranks: leading dims into the head loop
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    B, H = x4.shape[0], x4.shape[1]
    out = outputs.new_output(B, H, N, D, device=x.device, dtype=x.dtype)
    if N > 0 and B * H > 0:
        rotary_kernel[(triton.cdiv(N, BLOCK_TOKENS) * B,)](
            x4, cos, sin, out, N, H,
            x4.stride(0), x4.stride(1), x4.stride(2), out.stride(0), out.stride(1), out.stride(2),
            PAIRS=P, D=D, BLOCK_D=max(2, triton.next_power_of_2(D)), BLOCK_N=BLOCK_TOKENS, INVERSE=inverse,
        )
    return out.view(x.shape)


def _rotation_op(name: str, launch):
    """A custom op (so torch.compile traces it) x, a, b, inverse -> launch(x, a, b, inverse), whose
    backward is the same rotation inverted; a, b: the cos / sin tables, or the positions and
    frequencies."""

    @torch.library.custom_op(f"nsa::{name}", mutates_args=())
    def op(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inverse: bool) -> torch.Tensor:
        return launch(x, a, b, inverse=inverse)

    @op.register_fake
    def _fake(x, a, b, inverse):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        _, a, b, inverse = inputs
        ctx.save_for_backward(a, b)
        ctx.inverse = inverse

    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return op(grad, a, b, not ctx.inverse), None, None, None

    op.register_autograd(backward, setup_context=setup_context)
    return op


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., N, D) rotated by the pair tables cos / sin (N, P), 2P <= D."""
    return _rotary(x, cos.contiguous(), sin.contiguous(), False)


_rotary = _rotation_op("rotary", rotate)


def rotate_at_positions(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
                        inverse: bool = False) -> torch.Tensor:
    """x (B, H, N, D) with unit stride on D; positions (B, N) int64; freqs (P,) contiguous in the compute
    dtype -> rotated x, contiguous."""
    B, H, N, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = outputs.new_output(B, H, N, D, device=x.device, dtype=x.dtype)
    if N > 0 and B * H > 0:
        block_n = min(BLOCK_TOKENS, max(2, triton.next_power_of_2(N)))
        heads_per = HEADS_PER_PROGRAM
        rotary_positions_kernel[(triton.cdiv(N, block_n) * B, triton.cdiv(H, heads_per))](
            x, positions, freqs, out, N, H,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), positions.stride(0),
            heads_per, PAIRS=freqs.shape[0], D=D, BLOCK_D=max(2, triton.next_power_of_2(D)), BLOCK_N=block_n,
            INVERSE=inverse,
        )
    return out


def rotary_at_positions_triton(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    return _rotary_at_positions(x, positions.to(torch.int64).contiguous(), freqs.contiguous(), False)


_rotary_at_positions = _rotation_op("rotary_at_positions", rotate_at_positions)
