"""Key and value compression: windows of `compress_block_size` tokens every `stride` tokens
(left-padded by block - stride zeros, so window c covers tokens c * stride - (block - stride) ...
(c + 1) * stride - 1), learned intra-block positions added, one compression network for keys and
one for values mapping (b, hk, c, block, d) windows to (b, hk, c, d) tokens; the learned memory
tokens go in front. Plain functions over SparseAttention's parameters (whose names are the oracle's).

Packed documents (Seqs with cu_seqlens, batch 1): windows restart at every document (its first window
left-padded with zeros, never reaching into the previous document); document i's window j goes to
slot cu_seqlens[i] // stride + j of the T // stride slots (one gather, no host sync); a slot no
document owns gets a zero window, whose compressed token no query sees.

Dimension legend: b batch, hk kv heads, n tokens, c compressed tokens, d head dim, m memory tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nsa_core.seqs import Seqs


def _packed_window_tokens(total: int, block: int, stride: int, cu: Tensor) -> tuple[Tensor, Tensor]:
    """The token of every window position (C, block), clamped into the row, and whether it is a real
    token of the slot's document (C, block), for documents cu (N + 1,) packed into `total` tokens."""
    slots = torch.arange(total // stride, device=cu.device)
    first_slot = cu[:-1] // stride  # (N,) never decreasing; a document owning slots is the last one starting there
    doc = (torch.searchsorted(first_slot, slots, right=True) - 1).clamp(min=0)
    j = slots - first_slot[doc]
    owned = j < (cu[doc + 1] - cu[doc]) // stride
    tokens = cu[doc, None] + (j * stride - (block - stride))[:, None] + torch.arange(block, device=cu.device)
    real = owned[:, None] & (tokens >= cu[doc, None])
    return tokens.clamp(0, max(total - 1, 0)), real


def _packed_windows(t: Tensor, block: int, stride: int, seqs: Seqs) -> Tensor:
    """t (1, hk, T, d) of packed documents -> (1, hk, T // stride, block, d)."""
    shape = (t.shape[-2], block, stride)
    tokens, real = seqs.layout(("compression_windows", *shape),
                               lambda: _packed_window_tokens(*shape, seqs.cu_seqlens.long()))
    return t[:, :, tokens] * real[..., None].to(t.dtype)  # (1, hk, C, block, d)


def compression_windows(t: Tensor, block: int, stride: int, seqs: Seqs | None = None) -> Tensor:
    """t (b, hk, n, d) -> the n // stride complete windows (b, hk, c, block, d); packed documents:
    the windows of every document in its slots (module docstring)."""
    c = t.shape[-2] // stride
    if seqs is not None and seqs.is_packed:
        return _packed_windows(t, block, stride, seqs)
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
    """memory_kv (2, hk, m, d) in front of ck / cv (b, hk, c, d) -> (b, hk, m + c, d) each. The memory
    tokens take the compressed tokens' dtype (under autocast a float32 parameter meets bf16
    activations, as a linear layer's weight does)."""
    mem_k, mem_v = (m.to(ck.dtype).expand(ck.shape[0], -1, -1, -1) for m in memory_kv)
    return torch.cat((mem_k, ck), dim=-2), torch.cat((mem_v, cv), dim=-2)
