"""Launchers of the sliding-window kernels: tiles by head dim, grids, outputs. No host syncs.

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, TQ queries, TK keys (query row m at
key position q_offset + m), D / DV head dims. Packed documents: `first` (TQ,) int, the first token of each
token's document (batch 1, q_offset 0), or None.
"""

from __future__ import annotations

import torch
import triton

from nsa_core.kernels import outputs
from nsa_core.kernels.row_dot import row_dot
from nsa_core.kernels.limits import dtype_reason, head_dim_reason
from nsa_core.kernels.sliding_window.kernels import (
    sliding_window_bwd_dkdv_kernel,
    sliding_window_bwd_dq_kernel,
    sliding_window_fwd_kernel,
)


# launch settings of the dK/dV kernel that differ from tile_config's backward (benchmarks/kernels/window_backward.py
# sweeps the two backward kernels apart)
DKDV_OVERRIDES: dict = {}


def kernel_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    reason = dtype_reason(q) or head_dim_reason(q.shape[-1], v.shape[-1])
    if reason is not None:
        return reason
    o = torch.empty((*q.shape[:-1], v.shape[-1]), device="meta")  # the output's size, nothing allocated
    return outputs.too_large_reason(q=q, k=k, v=v, output=o)


def tile_config(q: torch.Tensor, v: torch.Tensor, backward: bool, first: torch.Tensor | None = None) -> dict:
    """The launch configuration (tiles, warps, constexprs) both passes take: tiles of 64 queries x 64
    keys, 4 warps, forward and backward, for head dims up to 128 (32 x 32 above); the backward's loops
    pipelined 2 deep. Looked up at every launch, so a sweep (benchmarks.kernels.sliding_window,
    benchmarks.kernels.window_backward) can stand its own in. Measured on an H100 at d 128, window 512
    (benchmarks/NOTES.md): forward 4.3 ms vs 6.8 with 128 x 64 / 8 warps at 64k; the backward's 2 stages
    against Triton's default 3: dK/dV 0.64 ms and dQ 0.24 ms less at 8k (G = 16), 4.4 and 2.3 at 64k. A 32-query
    backward tile was faster too, but adds in another order (not bit-equal to these tiles' sums)."""
    block_d, block_dv = (max(16, triton.next_power_of_2(n)) for n in (q.shape[-1], v.shape[-1]))
    block = 32 if max(block_d, block_dv) > 128 else 64
    cfg = dict(D=q.shape[-1], DV=v.shape[-1], BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_M=block, BLOCK_N=block,
               PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PACKED=first is not None, num_warps=4)
    if backward:
        cfg["num_stages"] = 2
    return cfg


def _strides(q, k, v, o) -> tuple:
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])


def sliding_window_fwd(q, k, v, window: int, scale: float, q_offset: int = 0,
                       first=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, HQ, TQ, D), k (B, HKV, TK, D), v (B, HKV, TK, DV), unit last strides -> o, lse (B, HQ, TQ) float32."""
    B, HQ, TQ, _ = q.shape
    HKV, TK = k.shape[1], k.shape[2]
    o = outputs.new_output(B, HQ, TQ, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = outputs.new_output(B, HQ, TQ, device=q.device, dtype=torch.float32)
    cfg = tile_config(q, v, backward=False, first=first)
    if TQ > 0 and B * HQ > 0:
        sliding_window_fwd_kernel[(B * HQ, triton.cdiv(TQ, cfg["BLOCK_M"]))](
            q, k, v, o, lse, q if first is None else first, *_strides(q, k, v, o), TQ, TK, q_offset, HQ, HQ // HKV,
            window, scale, **cfg)
    return o, lse


def sliding_window_bwd(do, q, k, v, o, lse, window: int, scale: float, q_offset: int = 0, first=None):
    """Gradients (dq, dk, dv) of the forward's o for the upstream do (unit last stride)."""
    B, HQ, TQ, D = q.shape
    HKV, TK, DV = k.shape[1], k.shape[2], v.shape[-1]
    delta = row_dot(do, o)
    dq = outputs.new_output(B, HQ, TQ, D, device=q.device, dtype=q.dtype)
    dk = outputs.new_output(B, HKV, TK, D, device=q.device, dtype=k.dtype)
    dv = outputs.new_output(B, HKV, TK, DV, device=q.device, dtype=v.dtype)
    cfg = tile_config(q, v, backward=True, first=first)
    args = (q if first is None else first, *_strides(q, k, v, do), TQ, TK, q_offset, HQ, HQ // HKV, window, scale)
    if TQ > 0 and B * HQ > 0:
        sliding_window_bwd_dq_kernel[(B * HQ, triton.cdiv(TQ, cfg["BLOCK_M"]))](q, k, v, do, lse, delta, dq, *args, **cfg)
    if TK > 0 and B * HQ > 0:  # every key tile writes its rows (zeros where no query reaches it)
        cfg = {**cfg, **DKDV_OVERRIDES}
        sliding_window_bwd_dkdv_kernel[(B * HKV, triton.cdiv(TK, cfg["BLOCK_N"]))](
            q, k, v, do, lse, delta, dk, dv, *args, **cfg)
    return dq, dk, dv
