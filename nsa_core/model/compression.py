"""Key and value compression: windows of `compress_block_size` tokens every `stride` tokens
(left-padded by block - stride zeros, so window c covers tokens c * stride - (block - stride) ...
(c + 1) * stride - 1), learned intra-block positions added, one compression network for keys and
one for values mapping (b, hk, c, block, d) windows to (b, hk, c, d) tokens; the learned memory
tokens go in front. Plain functions over SparseAttention's parameters (whose names are the oracle's).

Dimension legend: b batch, hk kv heads, n tokens, c compressed tokens, d head dim, m memory tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def compression_windows(t: Tensor, block: int, stride: int) -> Tensor:
    """t (b, hk, n, d) -> the n // stride complete windows (b, hk, c, block, d)."""
    c = t.shape[-2] // stride
    t = F.pad(t[:, :, : c * stride], (0, 0, block - stride, 0))
    return t.unfold(2, block, stride).transpose(-1, -2)


def compress_windows(windows_k: Tensor, windows_v: Tensor, *, k_positions: Tensor, v_positions: Tensor,
                     k_net: nn.Module, v_net: nn.Module) -> tuple[Tensor, Tensor]:
    """Windows (b, hk, c, block, d) -> compressed keys and values (b, hk, c, d)."""
    ck, cv = k_net(windows_k + k_positions[:, None]), v_net(windows_v + v_positions[:, None])
    expected = (*windows_k.shape[:3], windows_k.shape[-1])
    for name, t in (("keys", ck), ("values", cv)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"compress_mlp must map (b, h, w, n, d) windows to (b, h, w, d) = {expected}; "
                f"for {name} it returned {tuple(t.shape)}"
            )
    return ck, cv


def with_memory(memory_kv: Tensor, ck: Tensor, cv: Tensor) -> tuple[Tensor, Tensor]:
    """memory_kv (2, hk, m, d) in front of ck / cv (b, hk, c, d) -> (b, hk, m + c, d) each."""
    mem_k, mem_v = (m.expand(ck.shape[0], -1, -1, -1) for m in memory_kv)
    return torch.cat((mem_k, ck), dim=-2), torch.cat((mem_v, cv), dim=-2)
