"""The cached pass of a causal SparseAttention: prefill into the static cache (model/cache.py) and
decoding steps over it.

- Prefill (the cache is empty): the prompt (B, n, dim) runs through the parallel pass (the
  kernels), then its rotated keys, values, compressed keys and compression ring are
  written into the cache in one go. `lengths` (B,) gives each row's valid tokens of a right-padded
  prompt batch: causal attention never lets a token see the padding after it, and whatever the
  padding left in the cache is invisible until overwritten.
- A step (the cache holds tokens): x (B, K, dim) holds the next K >= 1 tokens of every sequence
  (K > 1: speculative verification or chunked prefill), token i of row b at position
  lengths[b] + i. Everything a step writes or reads is addressed by device tensors computed from
  `lengths`: static shapes, no host synchronisation, capturable in a CUDA graph. A step writes its
  tokens (rotated keys, values, the compression windows they complete: `_append_compressed`), then
  runs `SparseAttention.attend`, the parallel pass's own line of op calls, with a decoding-step
  descriptor (`Seqs.step(cache.lengths, K, capacity)`) and the cache's pages as the keys
  (`NSACache.branch_keys`): the compressed branch and the selection run as one op
  (ops/compressed_selection.py: one fused kernel attends the compressed pages, scores the blocks
  from that attention and picks the top-k), the selected and window branches and the gated combine
  run as one op where the kernels serve the step (ops/selected_window_combine.py: both branches'
  paged split-K programs in one launch, their merge and the combine in a second), else the branch
  ops read their pages through decode_attention (nsa_core/ops/paged.py) and `combine` follows.

Dimension legend: B batch, K new tokens per sequence, H query heads, HKV kv heads, G = H / HKV,
HI heads of the selection, D head dim, R compression block, NB selection blocks in the capacity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nsa_core.model.cache import DEFAULT_HEADROOM, NSACache
from nsa_core.model.lengths import check_step_lengths, prompt_lengths
from nsa_core.seqs import Seqs

if TYPE_CHECKING:
    from nsa_core.model.attention import SparseAttention


def run_with_cache(attn: SparseAttention, inp: Tensor, cache: NSACache | None, return_cache: bool,
                   lengths: Tensor | None):
    """The forward of a causal module called with a cache (or asked for one)."""
    cfg = attn.config
    if cache is None:
        n = inp.shape[1]
        cache = NSACache.allocate(cfg, inp.shape[0], max(2 * n, n + DEFAULT_HEADROOM), device=inp.device,
                                  dtype=_projection_dtype(attn, inp), growable=True)
    elif not isinstance(cache, NSACache):
        raise TypeError(f"cache must be an NSACache (from new_cache or return_cache=True), got {type(cache).__name__}")
    cache.check_for(cfg, inp)
    check_step_lengths(cache.is_empty, lengths)
    out = prefill(attn, inp, cache, lengths) if cache.is_empty else decode_step(attn, inp, cache)
    return (out, cache) if return_cache else out


def _projection_dtype(attn: SparseAttention, inp: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(inp.device.type):
        return torch.get_autocast_dtype(inp.device.type)
    return attn.to_qkv.weight.dtype


def _check_dtype(cache: NSACache, k: Tensor) -> None:
    if k.dtype != cache.dtype:
        raise ValueError(f"cache holds {cache.dtype}, the module's keys are {k.dtype}")


def prefill(attn: SparseAttention, inp: Tensor, cache: NSACache, lengths: Tensor | None) -> Tensor:
    """The parallel pass over the prompt inp (B, n, dim), written into the empty cache."""
    cfg = attn.config
    B, n, _ = inp.shape
    lengths = prompt_lengths(lengths, B, n, inp.device)
    cache.reserve(n)
    x = attn.norm(inp)
    q, k, v = attn.project(x)
    _check_dtype(cache, k)
    keys = attn.keys_of(k, v)
    out = attn.attend(x, q, keys, Seqs.batch(n))
    with torch.no_grad():
        positions = torch.arange(n, device=inp.device).expand(B, n)
        cache.write_tokens(positions, keys.rotated_k, keys.v, keys.window_k, keys.window_v)
        slots = torch.arange(keys.compressed_k.shape[2], device=inp.device).expand(B, -1)
        cache.write_compressed(slots, keys.compressed_k, keys.compressed_v)
        ring = cfg.compress_block_size
        ring_pos = lengths[:, None] - ring + torch.arange(ring, device=inp.device)  # (B, R)
        for buffer, source in zip((cache.ring_keys, cache.ring_values), attn.branch_kv(k, v)[0]):
            gathered = source.gather(2, ring_pos.clamp(min=0)[:, None, :, None].expand(-1, source.shape[1], -1,
                                                                                        source.shape[-1]))
            buffer.copy_(torch.where((ring_pos >= 0)[:, None, :, None], gathered, torch.zeros_like(gathered)))
        cache.begin(lengths, n)
    return out


def decode_step(attn: SparseAttention, inp: Tensor, cache: NSACache) -> Tensor:
    """The next K tokens inp (B, K, dim) of every sequence -> their outputs (B, K, dim): the new
    tokens written into the cache, then `attend` over the cache's pages."""
    cfg = attn.config
    K = inp.shape[1]
    cache.reserve(K)
    seqs = Seqs.step(cache.lengths, K, cache.capacity)
    positions = seqs.query_positions(inp.device)  # (B, K)
    x = attn.norm(inp)
    q, k, v = attn.project(x)
    _check_dtype(cache, k)
    (kc, vc), (ks, vs), (kw, vw) = attn.branch_kv(k, v)
    window = (kw, vw) if cfg.independent_kv else (None, None)
    cache.write_tokens(positions, ks, vs, *window, rotary_freqs=attn.rotary_emb.freqs)  # rotated on the way in
    _append_compressed(attn, cache, positions, kc, vc)
    out = attn.attend(x, q, cache.branch_keys(), seqs)
    cache.advance(K)
    return out


def _append_compressed(attn: SparseAttention, cache: NSACache, positions: Tensor, k: Tensor, v: Tensor) -> None:
    """The compression windows the new tokens complete go to their slots; the ring keeps the last R
    tokens (k, v: the cache's dtype, checked)."""
    cache.append_windows(positions, k, v, compress=attn.compress_windows, mlp=attn.mlp_compression())
