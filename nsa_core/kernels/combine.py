"""The gated combine of the three branches as one Triton pass each way, with autograd.

out[b, n, h, :] = g0 * compressed + g1 * fine + g2 * sliding, written token-major (B, N, H, Dv)
so the output projection reads it without a permuting copy. Backward in one pass too: the three
branch gradients and the gate gradients (row dot products, accumulated in float32).
The PyTorch twin is `nsa_core.reference.combine.combine_reference` (addcmul).

Dimension legend: B batch, H heads, N tokens, D head dim (value dim of the branches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_core.kernels.grid import split_pid

from nsa_core.kernels import outputs

BLOCK_TOKENS = 32


@triton.jit
def _load_tile(C, F, S, GATES, N, H,
               stride_cb, stride_ch, stride_cn, stride_fb, stride_fh, stride_fn, stride_sb, stride_sh, stride_sn,
               stride_gb, stride_gh, stride_gn, stride_gs,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tokens of one (batch, head): the three gates [N, 1] and the branch tiles
    [N, BLOCK_D], in float32, with the indices both kernels need."""
    pid_n, pid_bh = split_pid(tl.cdiv(N, BLOCK_N))
    pid_bh = pid_bh.to(tl.int64)  # 64-bit offsets: (B, H, N, D) passes 2**31 elements at batch 4 x 64k
    b, h = pid_bh // H, pid_bh % H
    tokens = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # x the token stride: past 2**31 in views
    dims = tl.arange(0, BLOCK_D)
    in_n = tokens < N
    mask = in_n[:, None] & (dims < D)[None, :]
    g = GATES + b * stride_gb + h * stride_gh + tokens * stride_gn
    g0 = tl.load(g, mask=in_n).to(tl.float32)[:, None]
    g1 = tl.load(g + stride_gs, mask=in_n).to(tl.float32)[:, None]
    g2 = tl.load(g + 2 * stride_gs, mask=in_n).to(tl.float32)[:, None]
    c = tl.load(C + b * stride_cb + h * stride_ch + tokens[:, None] * stride_cn + dims[None, :], mask=mask).to(tl.float32)
    f = tl.load(F + b * stride_fb + h * stride_fh + tokens[:, None] * stride_fn + dims[None, :], mask=mask).to(tl.float32)
    s = tl.load(S + b * stride_sb + h * stride_sh + tokens[:, None] * stride_sn + dims[None, :], mask=mask).to(tl.float32)
    return b, h, pid_bh, tokens, dims, in_n, mask, g0, g1, g2, c, f, s


@triton.jit
def combine_fwd_kernel(
    C, F, S, GATES, OUT,
    N, H,
    stride_cb, stride_ch, stride_cn, stride_fb, stride_fh, stride_fn, stride_sb, stride_sh, stride_sn,
    stride_gb, stride_gh, stride_gn, stride_gs, stride_ob, stride_on, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, h, pid_bh, tokens, dims, in_n, mask, g0, g1, g2, c, f, s = _load_tile(
        C, F, S, GATES, N, H, stride_cb, stride_ch, stride_cn, stride_fb, stride_fh, stride_fn, stride_sb, stride_sh,
        stride_sn, stride_gb, stride_gh, stride_gn, stride_gs, D, BLOCK_D, BLOCK_N)
    out = c * g0 + f * g1 + s * g2
    o = OUT + b * stride_ob + h * stride_oh + tokens[:, None] * stride_on + dims[None, :]
    tl.store(o, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def combine_bwd_kernel(
    C, F, S, GATES, DOUT, DC, DF, DS, DGATES,
    N, H,
    stride_cb, stride_ch, stride_cn, stride_fb, stride_fh, stride_fn, stride_sb, stride_sh, stride_sn,
    stride_gb, stride_gh, stride_gn, stride_gs, stride_ob, stride_on, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DC / DF / DS are (B, H, N, D) contiguous; DGATES (B, H, N, 3) contiguous."""
    b, h, pid_bh, tokens, dims, in_n, mask, g0, g1, g2, c, f, s = _load_tile(
        C, F, S, GATES, N, H, stride_cb, stride_ch, stride_cn, stride_fb, stride_fh, stride_fn, stride_sb, stride_sh,
        stride_sn, stride_gb, stride_gh, stride_gn, stride_gs, D, BLOCK_D, BLOCK_N)
    do = tl.load(DOUT + b * stride_ob + h * stride_oh + tokens[:, None] * stride_on + dims[None, :],
                 mask=mask).to(tl.float32)
    grad = (pid_bh * N + tokens)[:, None] * D + dims[None, :]
    tl.store(DC + grad, (do * g0).to(DC.dtype.element_ty), mask=mask)
    tl.store(DF + grad, (do * g1).to(DF.dtype.element_ty), mask=mask)
    tl.store(DS + grad, (do * g2).to(DS.dtype.element_ty), mask=mask)
    dg = DGATES + (pid_bh * N + tokens) * 3
    gate_dtype = DGATES.dtype.element_ty
    tl.store(dg, tl.sum(do * c, axis=1).to(gate_dtype), mask=in_n)
    tl.store(dg + 1, tl.sum(do * f, axis=1).to(gate_dtype), mask=in_n)
    tl.store(dg + 2, tl.sum(do * s, axis=1).to(gate_dtype), mask=in_n)


def _strides(c, f, s, gates, out_like) -> tuple:
    # out_like: (B, N, H, D) view; its strides are passed as (b, n, h)
    return (*c.stride()[:3], *f.stride()[:3], *s.stride()[:3], *gates.stride(), *out_like.stride()[:3])


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("nsa::combine_fwd", mutates_args=())
def _combine_fwd(c: torch.Tensor, f: torch.Tensor, s: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    B, H, N, D = c.shape
    c, f, s = (_unit_last(t) for t in (c, f, s))
    out = outputs.new_output(B, N, H, D, device=c.device, dtype=c.dtype)
    strides = _strides(c, f, s, gates, out)
    grid = (triton.cdiv(N, BLOCK_TOKENS) * B * H,)  # split back by split_pid
    if N > 0 and B * H > 0:
        combine_fwd_kernel[grid](c, f, s, gates, out, N, H, *strides, D=D, BLOCK_D=triton.next_power_of_2(D),
                                 BLOCK_N=BLOCK_TOKENS)
    return out


@_combine_fwd.register_fake
def _combine_fwd_fake(c, f, s, gates):
    B, H, N, D = c.shape
    return c.new_empty(B, N, H, D)


@torch.library.custom_op("nsa::combine_bwd", mutates_args=())
def _combine_bwd(dout: torch.Tensor, c: torch.Tensor, f: torch.Tensor, s: torch.Tensor,
                 gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, D = c.shape
    c, f, s, dout = (_unit_last(t) for t in (c, f, s, dout))
    dc, df, ds = (outputs.new_output(B, H, N, D, device=c.device, dtype=t.dtype) for t in (c, f, s))
    dgates = outputs.new_output(B, H, N, 3, device=c.device, dtype=gates.dtype)
    strides = _strides(c, f, s, gates, dout)
    grid = (triton.cdiv(N, BLOCK_TOKENS) * B * H,)  # split back by split_pid
    if N > 0 and B * H > 0:
        combine_bwd_kernel[grid](c, f, s, gates, dout, dc, df, ds, dgates, N, H, *strides, D=D,
                                 BLOCK_D=triton.next_power_of_2(D), BLOCK_N=BLOCK_TOKENS)
    return dc, df, ds, dgates


@_combine_bwd.register_fake
def _combine_bwd_fake(dout, c, f, s, gates):
    B, H, N, D = c.shape
    return (c.new_empty(B, H, N, D), f.new_empty(B, H, N, D), s.new_empty(B, H, N, D), gates.new_empty(B, H, N, 3))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    return _combine_bwd(dout, *ctx.saved_tensors)


_combine_fwd.register_autograd(_backward, setup_context=_setup_context)


def combine_triton(c: torch.Tensor, f: torch.Tensor, s: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """c, f, s (B, H, N, D) any strides with unit last stride; gates (B, H, N, 3) -> (B, N, H, D)."""
    return _combine_fwd(c, f, s, gates)
