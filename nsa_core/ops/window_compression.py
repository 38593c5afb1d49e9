"""append_compressed_windows: a decoding step's compression of the windows its new tokens complete,
written into the cache's compressed pages, and the compression ring (the last R tokens) moved on
(validation + dispatch).

Kernels (kernels/decode/window_compression.py, two launches for keys and values): for the default
compression network (intra-block positions added, Linear -> ReLU -> Linear over the flattened
window) with weights in the tokens' dtype, no gradient asked for, and at most MAX_KERNEL_TOKENS new
tokens per row; only the windows a token completes are computed (the weights are read on the steps
where one does). The PyTorch path (any network, any chunk): every new token's window compressed by
the module's own `compress` callable, incomplete ones written to the scratch slot, as before.

Dimension legend: B sequences, HKV kv heads, K new tokens per sequence, R window length, D head dim,
N hidden units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from nsa_core.ops.dispatch import use_kernels
from nsa_core.ops.page_write import write_pages

MAX_KERNEL_TOKENS = 16  # longer chunks (a chunked prefill) compress their windows as one batched GEMM


@dataclass(frozen=True)
class MLPCompression:
    """The tensors of the default compression of keys and values: intra-block positions (HKV, R, D)
    and the two linear layers (W1 (N, R * D), b1 (N,), W2 (D, N), b2 (D,)) of each network."""

    k_positions: Tensor
    v_positions: Tensor
    k_layers: tuple[Tensor, Tensor, Tensor, Tensor]
    v_layers: tuple[Tensor, Tensor, Tensor, Tensor]

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.k_positions, self.v_positions, *self.k_layers, *self.v_layers)


def append_compressed_windows(ring_k: Tensor, ring_v: Tensor, k: Tensor, v: Tensor, positions: Tensor, *,
                              slot_of: Tensor, scratch: int, ck_pages: Tensor, cv_pages: Tensor, table: Tensor,
                              compress: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                              mlp: MLPCompression | None, backend: str = "auto") -> None:
    """The step's unrotated k / v (B, HKV, K, D) at positions (B, K), after the ring's ring_k /
    ring_v (B, HKV, R, D) (the R tokens before each row's first new one): the window ending at each
    new token that completes one (slot_of[position] != scratch, slot_of (capacity,) int64) is
    compressed into its logical slot of ck_pages / cv_pages (NCP, HKV, CPAGE, D) behind table
    (B, pages per row); then the ring holds the last R tokens. `compress` maps windows
    (B, HKV, W, R, D) to compressed tokens (B, HKV, W, D) (SparseAttention.compress_windows); `mlp`:
    the same compression's tensors when it is the default network (the kernels' input), else None."""
    B, HKV, K, D = k.shape if k.ndim == 4 else (None,) * 4
    R = ring_k.shape[2] if ring_k.ndim == 4 else None
    if (k.ndim != 4 or v.shape != k.shape or ring_k.shape != (B, HKV, R, D) or ring_v.shape != ring_k.shape
            or positions.shape != (B, K)):
        raise ValueError(f"append_compressed_windows needs k, v (B, HKV, K, D), rings (B, HKV, R, D) and positions "
                         f"(B, K), got k {tuple(k.shape)}, v {tuple(v.shape)}, ring_k {tuple(ring_k.shape)}, ring_v "
                         f"{tuple(ring_v.shape)}, positions {tuple(positions.shape)}")
    if ring_k.dtype != k.dtype or ring_v.dtype != v.dtype:
        raise TypeError(f"the ring holds {ring_k.dtype}, the step's tokens are {k.dtype}")
    unsupported = lambda: _unsupported(k, v, ring_k, ring_v, positions, ck_pages, cv_pages, mlp)  # noqa: E731
    if use_kernels(backend, k.device, "append_compressed_windows", unsupported, by_design=_by_design(k, mlp)):
        from nsa_core.kernels.decode.window_compression import compress_step_windows_triton

        compress_step_windows_triton(ring_k, ring_v, k, v, positions, slot_of, scratch, ck_pages, cv_pages, table,
                                     *mlp.tensors())
        return
    tokens_k, tokens_v = torch.cat((ring_k, k), dim=2), torch.cat((ring_v, v), dim=2)  # (B, HKV, R + K, D)
    windows_k, windows_v = (t[:, :, 1:].unfold(2, R, 1).transpose(-1, -2) for t in (tokens_k, tokens_v))
    ck, cv = compress(windows_k, windows_v)  # (B, HKV, K, D)
    write_pages(ck_pages, cv_pages, table, slot_of[positions], ck, cv, backend=backend)
    ring_k.copy_(tokens_k[:, :, -R:])
    ring_v.copy_(tokens_v[:, :, -R:])


def _by_design(k: Tensor, mlp: MLPCompression | None) -> str | None:
    if mlp is None:
        return "a compression network other than the default MLP"
    if k.shape[2] > MAX_KERNEL_TOKENS:
        return f"more than {MAX_KERNEL_TOKENS} new tokens per row (one batched GEMM)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (k, *mlp.tensors())):
        return "a gradient asked for (the step kernels have no backward)"
    if any(t.dtype != k.dtype for t in mlp.tensors()):
        return "compression weights in another dtype than the tokens (autocast)"
    return None


def _unsupported(k: Tensor, v: Tensor, ring_k: Tensor, ring_v: Tensor, positions: Tensor, ck_pages: Tensor,
                 cv_pages: Tensor, mlp: MLPCompression) -> str | None:
    from nsa_core.kernels.limits import dtype_reason, head_dim_reason

    reason = dtype_reason(k) or head_dim_reason(k.shape[-1], k.shape[-1])
    if reason is not None:
        return reason
    if any(t.stride(-1) != 1 for t in (k, v, ring_k, ring_v, *mlp.tensors(), ck_pages, positions)):
        return "tensors without unit stride on their last dim"
    pairs = ((k, v), (ring_k, ring_v), (ck_pages, cv_pages), (mlp.k_positions, mlp.v_positions),
             *zip(mlp.k_layers, mlp.v_layers))
    if any(a.stride() != b.stride() for a, b in pairs):
        return "key and value tensors of different layouts"
    if ck_pages.dtype != k.dtype or cv_pages.dtype != k.dtype:
        return f"compressed pages of {ck_pages.dtype} for tokens of {k.dtype}"
    w1, _, w2, _ = mlp.k_layers
    if w1.shape[1] != mlp.k_positions.shape[1] * k.shape[-1] or w2.shape != (k.shape[-1], w1.shape[0]):
        return "compression layers that do not map a window of R x D to D"
    if any(a.shape != b.shape for a, b in zip(mlp.k_layers, mlp.v_layers)) or mlp.k_positions.shape != mlp.v_positions.shape:
        return "key and value compressions of different shapes"
    return None
