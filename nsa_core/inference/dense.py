"""A static cache for the Transformer's dense attention layers (the baseline NSA is compared with):
keys and values preallocated for `capacity` tokens, written in place at each sequence's position;
a decoding step attends the whole buffer under a mask of each query's visible keys (static shapes,
no host synchronisation: capturable in a CUDA graph), as gpt-fast does.

Dimension legend: B batch, H query heads, HKV kv heads, K new tokens, N capacity, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_core.inference.lengths import prompt_lengths
from nsa_core.model.cache import room_needed


@dataclass
class DenseCache:
    keys: Tensor  # (B, HKV, N, D), rotated
    values: Tensor  # (B, HKV, N, D)
    lengths: Tensor  # (B,) int64
    capacity: int
    filled: int = 0
    growable: bool = False

    @classmethod
    def allocate(cls, batch_size: int, capacity: int, kv_heads: int, dim_head: int, *, device, dtype,
                 growable: bool = False) -> "DenseCache":
        for name, value in (("batch_size", batch_size), ("max_seq_len", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (batch_size, kv_heads, capacity, dim_head)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(batch_size, device=device, dtype=torch.int64), capacity, growable=growable)

    def reserve(self, new_tokens: int) -> None:
        need = room_needed(self.capacity, self.filled, new_tokens, self.growable)
        if not need:
            return
        capacity = max(need, 2 * self.capacity)
        grow = capacity - self.capacity
        self.keys = F.pad(self.keys, (0, 0, 0, grow))
        self.values = F.pad(self.values, (0, 0, 0, grow))
        self.capacity = capacity


def dense_with_cache(attn, x: Tensor, cache: DenseCache | None, lengths: Tensor | None):
    """DenseAttention's forward with a cache: x (B, K, dim) -> (output (B, K, dim), cache). An empty
    cache takes x as the prompt (rows right-padded to `lengths`), a filled one as the next tokens."""
    if not attn.causal:
        raise ValueError("cache / return_cache need a causal model (causal=True)")
    B, K, _ = x.shape
    xn = attn.norm(x)
    q, k, v = attn.project(xn)
    if cache is None:
        cache = DenseCache.allocate(B, max(2 * K, K + 1024), attn.kv_heads, attn.dim_head, device=x.device,
                                    dtype=k.dtype, growable=True)
    if not isinstance(cache, DenseCache) or cache.keys.shape[0] != B:
        raise ValueError("cache must be the DenseCache of this layer for this batch")
    prefill = cache.filled == 0
    if not prefill and lengths is not None:
        raise ValueError("lengths describes a prompt: pass it with an empty cache (the first call)")
    if prefill:
        lengths = prompt_lengths(lengths, B, K, x.device)
    cache.reserve(K)
    start = torch.zeros_like(cache.lengths) if prefill else cache.lengths
    positions = start[:, None] + torch.arange(K, device=x.device)  # (B, K)
    cos, sin = attn.rotary_embed.tables(positions.flatten(), q.dtype)
    cos, sin = (t.view(B, 1, K, -1) for t in (cos, sin))
    from nsa_core.ops.rotary import rotary

    q, k = rotary(q, cos, sin, backend="torch"), rotary(k, cos, sin, backend="torch")
    batch = torch.arange(B, device=x.device)[:, None].expand(B, K)
    cache.keys[batch, :, positions] = k.transpose(1, 2).to(cache.keys.dtype)
    cache.values[batch, :, positions] = v.transpose(1, 2).to(cache.values.dtype)
    if prefill:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.heads != attn.kv_heads)
        cache.lengths.copy_(lengths)
    else:
        visible = torch.arange(cache.capacity, device=x.device) <= positions[..., None]  # (B, K, N)
        out = F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=visible[:, None],
                                             enable_gqa=attn.heads != attn.kv_heads)
        cache.lengths += K
    cache.filled += K
    return attn.to_out(out.transpose(1, 2).flatten(-2)), cache
