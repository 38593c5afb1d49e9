"""The cached pass of a causal SparseAttention: prefill into the static cache (model/cache.py) and
decoding steps over it.

- Prefill (the cache is empty): the prompt (B, n, dim) runs through the parallel pass (the
  kernels), then its rotated keys, values, compressed keys, pooled keys and compression ring are
  written into the cache in one go. `lengths` (B,) gives each row's valid tokens of a right-padded
  prompt batch: causal attention never lets a token see the padding after it, and whatever the
  padding left in the cache is invisible until overwritten.
- A step (the cache holds tokens): x (B, K, dim) holds the next K >= 1 tokens of every sequence
  (K > 1: speculative verification or chunked prefill), token i of row b at position
  lengths[b] + i. Everything a step writes or reads is addressed by device tensors computed from
  `lengths`: static shapes, no host synchronisation, capturable in a CUDA graph. The three branches
  run on `decode_attention` (paged split-K kernels) over page lists built here, the selection on
  `select_step_blocks` (the parallel pass's scoring rule over the cache's keys), the gated combine
  on `combine`. The branches' page lists differ from the parallel pass's descriptors, so a step is its
  own op sequence (the same ops, the same order as `SparseAttention.attend`).

Dimension legend: B batch, K new tokens per sequence, H query heads, HKV kv heads, G = H / HKV,
HI heads of the selection, D head dim, R compression block, NB selection blocks in the capacity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nsa_core.model.cache import COMPRESSED_PAGE, DEFAULT_HEADROOM, NSACache
from nsa_core.model.lengths import check_step_lengths, prompt_lengths
from nsa_core.ops.combine import combine
from nsa_core.ops.decode_attention import decode_attention
from nsa_core.ops.rotary import rotary
from nsa_core.ops.step_selection import select_step_blocks
from nsa_core.seqs import Seqs
from nsa_core.selection import Selection

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
        if cache.pooled_keys is not None:
            mem, ratio = cfg.num_compressed_mem_kv, cfg.selection_block_size // cfg.stride
            ck = keys.compressed_k[:, :, mem:]
            nb = ck.shape[2] // ratio
            cache.pooled_keys[:, :, :nb] = ck[:, :, : nb * ratio].unflatten(2, (nb, ratio)).mean(dim=3)
        ring = cfg.compress_block_size
        ring_pos = lengths[:, None] - ring + torch.arange(ring, device=inp.device)  # (B, R)
        for buffer, source in zip((cache.ring_keys, cache.ring_values), attn.branch_kv(k, v)[0]):
            gathered = source.gather(2, ring_pos.clamp(min=0)[:, None, :, None].expand(-1, source.shape[1], -1,
                                                                                        source.shape[-1]))
            buffer.copy_(torch.where((ring_pos >= 0)[:, None, :, None], gathered, torch.zeros_like(gathered)))
        cache.begin(lengths, n)
    return out


def decode_step(attn: SparseAttention, inp: Tensor, cache: NSACache) -> Tensor:
    """The next K tokens inp (B, K, dim) of every sequence -> their outputs (B, K, dim)."""
    cfg = attn.config
    B, K, _ = inp.shape
    cache.reserve(K)
    positions = cache.lengths[:, None] + torch.arange(K, device=inp.device)  # (B, K)
    x = attn.norm(inp)
    q, k, v = attn.project(x)
    _check_dtype(cache, k)
    cos, sin = attn.rotary_emb.tables(positions.flatten(), q.dtype)
    cos, sin = (t.view(B, 1, K, -1) for t in (cos, sin))
    q_rot = rotary(q, cos, sin, backend=cfg.backend)
    (kc, vc), (ks, vs), (kw, vw) = attn.branch_kv(k, v)
    window = (rotary(kw, cos, sin, backend=cfg.backend), vw) if cfg.independent_kv else (None, None)
    cache.write_tokens(positions, rotary(ks, cos, sin, backend=cfg.backend), vs, *window)
    _append_compressed(attn, cache, positions, kc, vc)

    compressed = _compressed_branch(attn, cache, q, positions)
    selection = _select(attn, cache, q, positions)
    fine = _selected_branch(attn, cache, q_rot, positions, selection)
    sliding = _window_branch(attn, cache, q_rot, positions)
    gates = attn.to_strategy_combine(x)  # (B, H, K, 3)
    out = attn.combine_heads(combine(compressed, fine, sliding, gates, backend=cfg.backend).flatten(-2))
    cache.advance(K)
    return out


def _append_compressed(attn: SparseAttention, cache: NSACache, positions: Tensor, k: Tensor, v: Tensor) -> None:
    """Compress the window ending at each new token; complete ones go to their slot, the others to
    the scratch slot. Then the ring keeps the last R tokens, and completed selection blocks get
    their pooled key."""
    cfg = attn.config
    R, stride, mem = cfg.compress_block_size, cfg.stride, cfg.num_compressed_mem_kv
    tokens_k = torch.cat((cache.ring_keys, k.to(cache.dtype)), dim=2)  # (B, HKV, R + K, D)
    tokens_v = torch.cat((cache.ring_values, v.to(cache.dtype)), dim=2)
    windows_k, windows_v = (t[:, :, 1:].unfold(2, R, 1).transpose(-1, -2) for t in (tokens_k, tokens_v))
    ck, cv = attn.compress_windows(windows_k, windows_v)  # (B, HKV, K, D)
    complete = (positions + 1) % stride == 0
    index = (positions + 1) // stride - 1  # the compressed token a complete window becomes
    cache.write_compressed(torch.where(complete, mem + index, cache.scratch_slot), ck, cv)
    cache.ring_keys.copy_(tokens_k[:, :, -R:])
    cache.ring_values.copy_(tokens_v[:, :, -R:])
    if cache.pooled_keys is None:
        return
    ratio = cfg.selection_block_size // stride
    block = index.clamp(min=0) // ratio  # (B, K)
    members = mem + block[..., None] * ratio + torch.arange(ratio, device=block.device)  # (B, K, r)
    members = members.clamp(max=cache.scratch_slot).flatten(1)
    pooled = cache.read_compressed_keys(members).unflatten(2, (positions.shape[1], ratio)).mean(dim=3)
    scratch = cache.pooled_keys.shape[2] - 1
    target = torch.where(complete, block.clamp(max=scratch), scratch)
    batch = torch.arange(positions.shape[0], device=block.device)[:, None].expand_as(target)
    cache.pooled_keys[batch, :, target] = pooled.transpose(1, 2)


def _compressed_branch(attn: SparseAttention, cache: NSACache, q: Tensor, positions: Tensor) -> Tensor:
    """Memory tokens and the compressed blocks completed before each query."""
    cfg = attn.config
    B, _, K, _ = q.shape
    hi = cfg.num_compressed_mem_kv + positions // cfg.stride - 1
    pages = cache.compressed_table.shape[1]
    blocks = torch.arange(pages, device=q.device).view(1, 1, 1, pages).expand(B, cfg.num_kv_heads, K, pages)
    valid = blocks * COMPRESSED_PAGE <= hi[:, None, :, None]
    return decode_attention(q, cache.ck_pages, cache.cv_pages, cache.compressed_table, blocks, valid, hi,
                            scale=attn.scale, backend=cfg.backend)


def _select(attn: SparseAttention, cache: NSACache, q: Tensor, positions: Tensor) -> Selection | None:
    """The selection of each new query, as the parallel pass makes it."""
    return select_step_blocks(q, cache.selection_keys(), attn.selection_rule, positions)


def _selected_branch(attn: SparseAttention, cache: NSACache, q_rot: Tensor, positions: Tensor, selection: Selection | None) -> Tensor:
    """The selected blocks and each query's own block, keys up to the query."""
    B, _, K, _ = q_rot.shape
    heads = attn.kv_heads if selection is None else selection.indices.shape[1]
    own = (positions // cache.page_size)[:, None, :, None].expand(B, heads, K, 1)
    blocks, valid = own, torch.ones_like(own, dtype=torch.bool)
    if selection is not None:
        blocks = torch.cat((selection.indices, own), dim=-1)
        valid = torch.cat((selection.valid, valid), dim=-1)
    return decode_attention(q_rot, cache.k_pages, cache.v_pages, cache.block_table, blocks, valid, positions,
                            scale=attn.scale, backend=attn.config.backend)


def _window_branch(attn: SparseAttention, cache: NSACache, q_rot: Tensor, positions: Tensor) -> Tensor:
    """Keys positions - window ... positions."""
    window, page = attn.config.sliding_window_size, cache.page_size
    B, _, K, _ = q_rot.shape
    count = window // page + 2
    first = (positions - window).clamp(min=0) // page
    blocks = first[:, None, :, None] + torch.arange(count, device=q_rot.device)
    valid = blocks <= (positions // page)[:, None, :, None]
    blocks = torch.minimum(blocks, (positions // page)[:, None, :, None]).expand(B, attn.kv_heads, K, count)
    valid = valid.expand(B, attn.kv_heads, K, count)
    return decode_attention(q_rot, *cache.window_pages(), cache.block_table, blocks, valid, positions,
                            positions - window, scale=attn.scale, backend=attn.config.backend)
