"""torch.library registration of the selected-attention kernels, with autograd and fake
(meta) implementations, so torch.compile(fullgraph=True) traces through them and
torch.library.opcheck passes."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.kernels.selected_attention import launch, split_blocks, tiles
from nsa_core.kernels.selected_attention.launch import selected_attention_bwd, selected_attention_fwd_with_csr


@torch.library.custom_op("nsa::selected_attention_fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, gates: Tensor | None, block_size: int, causal: bool,
         scale: float, window: int, table: Tensor | None = None, q_offset: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (o, lse, and the CSR index (entries, offsets) the by-block forward built, for the
    backward; empty when the forward ran by query). table: packed documents (launch.packed_block_table);
    q_offset: the key position of the first query (q (B, HQ, TQ, D) over k (B, HKV, TK, D))."""
    return selected_attention_fwd_with_csr(q, k, v, idx, gates, block_size, causal, scale, window, table, q_offset)


@_fwd.register_fake
def _fwd_fake(q, k, v, idx, gates, block_size, causal, scale, window, table=None, q_offset=0):
    B, HQ, T, _ = q.shape
    key_tiles = tiles.key_tiles(q.shape[-1], v.shape[-1], block_size, q.dtype)
    if launch.choose_scheme(q, k, idx, tiles=key_tiles, packed=table is not None) == "by_block":  # looked up at call time: tests replace it
        entries_shape, offsets_shape, index_dtype = launch.csr_size(idx, k.shape[1], block_size, k.shape[2], table)
        entries, offsets = idx.new_empty(entries_shape, dtype=index_dtype), idx.new_empty(offsets_shape, dtype=index_dtype)
    else:
        entries, offsets = idx.new_empty(0, dtype=torch.int32), idx.new_empty(0, dtype=torch.int32)
    return q.new_empty(B, HQ, T, v.shape[-1]), q.new_empty(B, HQ, T, dtype=torch.float32), entries, offsets


@torch.library.custom_op("nsa::selected_attention_bwd", mutates_args=())
def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, idx: Tensor, gates: Tensor | None,
         entries: Tensor, offsets: Tensor, block_size: int, causal: bool, scale: float,
         window: int, table: Tensor | None = None, q_offset: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dgates = selected_attention_bwd(do, q, k, v, o, lse, idx, gates, block_size, causal, scale, window,
                                                csr=(entries, offsets), table=table, q_offset=q_offset)
    if dgates is None:
        dgates = q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dgates


@_bwd.register_fake
def _bwd_fake(do, q, k, v, o, lse, idx, gates, entries, offsets, block_size, causal, scale, window, table=None,
              q_offset=0):
    dgates = q.new_empty(idx.shape if gates is not None else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dgates


def _setup_context(ctx, inputs, output):
    q, k, v, idx, gates, block_size, causal, scale, window, table, q_offset = inputs
    o, lse, entries, offsets = output
    ctx.mark_non_differentiable(lse, entries, offsets)
    ctx.save_for_backward(q, k, v, o, lse, idx, gates, entries, offsets, table)
    ctx.block_size, ctx.causal, ctx.scale, ctx.window, ctx.q_offset = block_size, causal, scale, window, q_offset


def _backward(ctx, do, dlse, dentries, doffsets):
    q, k, v, o, lse, idx, gates, entries, offsets, table = ctx.saved_tensors
    dq, dk, dv, dgates = _bwd(do, q, k, v, o, lse, idx, gates, entries, offsets, ctx.block_size, ctx.causal, ctx.scale,
                              ctx.window, table, ctx.q_offset)
    dgates = dgates.to(gates.dtype) if gates is not None else None
    return dq, dk, dv, None, dgates, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def selected_attention_triton(q, k, v, indices, block_size, valid, gates, causal, scale, window=None,
                              cu_seqlens=None, q_offset=0) -> Tensor:
    """Kernel path of nsa_core.selected_attention (inputs already validated). cu_seqlens: packed
    documents (batch 1), indices counted from each query's document start. q_offset: query i sits at
    key position q_offset + i (q (B, HQ, TQ, D) over k (B, HKV, TK, D), q_offset + TQ <= TK). Blocks
    whose key tile does not fit shared memory run as smaller blocks (tiles.kernel_block, split_blocks)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    idx = indices.to(torch.int32)
    if valid is not None:
        idx = torch.where(valid, idx, torch.full_like(idx, -1))
    sub_block = tiles.kernel_block(q.shape[-1], v.shape[-1], int(block_size), q.dtype)
    if sub_block != block_size:
        positions = split_blocks.token_positions(q.shape[2], q.device, cu_seqlens) + int(q_offset)  # key positions
        idx, gates = split_blocks.split_selection(idx, gates, int(block_size), sub_block, bool(causal), positions,
                                                  k.shape[2])
        block_size = sub_block
    table = None
    if cu_seqlens is not None:
        idx, table = launch.packed_block_table(idx, cu_seqlens, int(block_size))
    idx = idx.contiguous()
    if gates is not None:
        gates = gates.contiguous()
    o, *_ = _fwd(q.contiguous(), k.contiguous(), v.contiguous(), idx, gates, int(block_size), bool(causal), scale,
                0 if window is None else int(window), table, int(q_offset))
    return o
