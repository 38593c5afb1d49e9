"""DenseAttention, the Transformer's dense layer (the baseline NSA is compared with), and its static
cache: keys and values preallocated for `capacity` tokens, written in place at each sequence's
position; a decoding step attends the whole buffer under a mask of each query's visible keys (static
shapes, no host synchronisation: capturable in a CUDA graph), as gpt-fast does.

Dimension legend: B batch, H query heads, HKV kv heads, K new tokens, N capacity, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nsa_core.model.cache import DEFAULT_HEADROOM, StepCache
from nsa_core.model.lengths import check_step_lengths, prompt_lengths
from nsa_core.model.modes import CACHED, forward_mode, packed_seqs
from nsa_core.model.rotary import RotaryEmbedding
from nsa_core.ops.document_attention import document_attention
from nsa_core.ops.rotary import rotary
from nsa_core.seqs import Seqs

@dataclass
class DenseCache(StepCache):
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

    def _buffers(self) -> tuple[Tensor, ...]:
        return self.keys, self.values

    def _grow_to(self, capacity: int) -> None:
        grow = capacity - self.capacity
        self.keys = F.pad(self.keys, (0, 0, 0, grow))
        self.values = F.pad(self.values, (0, 0, 0, grow))
        self.capacity = capacity


class DenseAttention(nn.Module):
    """Full causal (or bidirectional) attention with rotary embeddings and GQA."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, causal: bool = True, kv_heads: int | None = None):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if heads % kv_heads != 0:
            raise ValueError(f"kv_heads must divide heads, got heads={heads}, kv_heads={kv_heads}")
        self.heads, self.kv_heads, self.dim_head, self.causal = heads, kv_heads, dim_head, causal
        self.norm = nn.RMSNorm(dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def project(self, x_normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(b, n, dim) -> q (b, h, n, d), k and v (b, hk, n, d)."""
        return tuple(proj(x_normed).unflatten(-1, (-1, self.dim_head)).transpose(1, 2)
                     for proj in (self.to_q, self.to_k, self.to_v))

    def new_cache(self, batch_size: int, max_seq_len: int, *, device=None, dtype=None) -> DenseCache:
        weight = self.to_q.weight
        return DenseCache.allocate(batch_size, max_seq_len, self.kv_heads, self.dim_head,
                                   device=weight.device if device is None else device,
                                   dtype=weight.dtype if dtype is None else dtype)

    def forward(self, x: Tensor, cache: DenseCache | None = None, return_cache: bool = False, *,
                lengths: Tensor | None = None, cu_seqlens: Tensor | None = None):
        """x (b, n, dim) -> (b, n, dim); cu_seqlens: x (1, total, dim) holds packed documents, each
        attending only to itself (ops/document_attention.py: one FlexAttention call on CUDA, one SDPA
        call per document elsewhere). With a cache: an empty one takes x as the prompt (rows
        right-padded to `lengths`), a filled one as the next tokens (cached_forward)."""
        mode = forward_mode(cache=cache, return_cache=return_cache, lengths=lengths, cu_seqlens=cu_seqlens,
                            causal=self.causal)
        if mode == CACHED:
            out, cache = self.cached_forward(x, cache, lengths)
            return (out, cache) if return_cache else out
        seqs = packed_seqs(cu_seqlens, x) or Seqs.batch(x.shape[1])
        x = self.norm(x)
        q, k, v = self.project(x)
        cos, sin = self.rotary_embed.tables(seqs.query_positions(x.device), q.dtype)
        q, k = rotary(q, cos, sin, backend="torch"), rotary(k, cos, sin, backend="torch")
        if seqs.is_packed:
            out = document_attention(q, k, v, causal=self.causal, seqs=seqs)
        else:
            group = self.heads // self.kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.to_out(out.transpose(1, 2).flatten(-2))

    def cached_forward(self, x: Tensor, cache: DenseCache | None, lengths: Tensor | None) -> tuple[Tensor, DenseCache]:
        """x (B, K, dim) -> (output (B, K, dim), cache). An empty cache takes x as the prompt (rows
        right-padded to `lengths`), a filled one as the next tokens."""
        B, K, _ = x.shape
        xn = self.norm(x)
        q, k, v = self.project(xn)
        if cache is None:
            cache = DenseCache.allocate(B, max(2 * K, K + DEFAULT_HEADROOM), self.kv_heads, self.dim_head,
                                        device=x.device, dtype=k.dtype, growable=True)
        if not isinstance(cache, DenseCache) or cache.keys.shape[0] != B:
            raise ValueError("cache must be the DenseCache of this layer for this batch")
        prefill = cache.is_empty
        check_step_lengths(prefill, lengths)
        if prefill:
            lengths = prompt_lengths(lengths, B, K, x.device)
        cache.reserve(K)
        start = torch.zeros_like(cache.lengths) if prefill else cache.lengths
        positions = start[:, None] + torch.arange(K, device=x.device)  # (B, K)
        cos, sin = self.rotary_embed.tables(positions.flatten(), q.dtype)
        cos, sin = (t.view(B, 1, K, -1) for t in (cos, sin))
        q, k = rotary(q, cos, sin, backend="torch"), rotary(k, cos, sin, backend="torch")
        batch = torch.arange(B, device=x.device)[:, None].expand(B, K)
        cache.keys[batch, :, positions] = k.transpose(1, 2).to(cache.keys.dtype)
        cache.values[batch, :, positions] = v.transpose(1, 2).to(cache.values.dtype)
        if prefill:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
            cache.begin(lengths, K)
        else:
            visible = torch.arange(cache.capacity, device=x.device) <= positions[..., None]  # (B, K, N)
            out = F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=visible[:, None],
                                                 enable_gqa=self.heads != self.kv_heads)
            cache.advance(K)
        return self.to_out(out.transpose(1, 2).flatten(-2)), cache
