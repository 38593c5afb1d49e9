"""Cached one-token decoding for causal SparseAttention.

What the cache holds, and why (b batch, hk kv heads, t tokens so far, d head dim):
- keys (b, hk, t, d), rotated, and values (b, hk, t, d): the selection branch may pick any
  earlier block and the sliding window reaches the last `window` tokens, so every past key and
  value stays reachable;
- compressed_keys / compressed_values (b, hk, c, d): the compression windows completed so far
  (memory tokens are parameters and are not copied in);
- tail_keys / tail_values (b, hk, r, d), unrotated: the tokens of the compression window being
  filled, its overlap with the previous window included (zeros before the sequence start).

A decode step for the token at position t computes exactly what the parallel pass computes for
query t: compressed attention over the memory tokens and the blocks completed before t, block
selection from those logits, attention over the selected blocks plus the own block up to t,
and the window t - window ... t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_core.reference.masked_softmax import masked_attention


@dataclass
class NSACache:
    keys: Tensor
    values: Tensor
    compressed_keys: Tensor
    compressed_values: Tensor
    tail_keys: Tensor
    tail_values: Tensor

    @property
    def seq_len(self) -> int:
        return self.keys.shape[-2]

    @classmethod
    def from_prefill(cls, attn, k: Tensor, k_rot: Tensor, v: Tensor, ck: Tensor, cv: Tensor) -> "NSACache":
        n = k.shape[-2]
        start = (n // attn.stride) * attn.stride
        overlap = attn.compress_block_size - attn.stride
        tail_k, tail_v = (F.pad(t, (0, 0, overlap, 0))[:, :, start:] for t in (k, v))
        return cls(k_rot, v, ck, cv, tail_k, tail_v)

    def check_for(self, attn, inp: Tensor) -> None:
        expected = (inp.shape[0], attn.kv_heads)
        if tuple(self.keys.shape[:2]) != expected or self.keys.shape[-1] != attn.dim_head:
            raise ValueError(
                f"cache does not fit this module and input: keys have shape {tuple(self.keys.shape)}, "
                f"expected (batch={expected[0]}, kv_heads={expected[1]}, t, dim_head={attn.dim_head})"
            )


def decode(attn, inp: Tensor, cache: NSACache, return_cache: bool):
    """Decode the tokens of inp (b, n, dim) one after the other against the cache."""
    if not isinstance(cache, NSACache):
        raise TypeError(f"cache must be an NSACache (returned with return_cache=True), got {type(cache).__name__}")
    cache.check_for(attn, inp)
    outs = []
    for i in range(inp.shape[1]):
        out, cache = decode_step(attn, inp[:, i : i + 1], cache)
        outs.append(out)
    out = torch.cat(outs, dim=1)
    return (out, cache) if return_cache else out


def decode_step(attn, inp: Tensor, cache: NSACache) -> tuple[Tensor, NSACache]:
    t = cache.seq_len
    x = attn.norm(inp)
    q, k, v = attn.project(x)  # (b, h, 1, d), (b, hk, 1, d)

    # 1. compressed attention over the memory tokens and the blocks completed before t
    ck_all, cv_all = attn.with_memory(cache.compressed_keys, cache.compressed_values)
    compressed_out, selection = attn.compressed_and_select(q, ck_all, cv_all, query_offset=t)
    tail_k = torch.cat((cache.tail_keys, k), dim=-2)
    tail_v = torch.cat((cache.tail_values, v), dim=-2)
    ck, cv = cache.compressed_keys, cache.compressed_values
    if tail_k.shape[-2] == attn.compress_block_size:
        new_k, new_v = attn.compress_windows(tail_k[:, :, None], tail_v[:, :, None])
        ck, cv = torch.cat((ck, new_k), dim=-2), torch.cat((cv, new_v), dim=-2)
        tail_k, tail_v = tail_k[:, :, attn.stride :], tail_v[:, :, attn.stride :]

    # rotated keys of every token so far
    q_rot = attn.rotary_emb.rotate(q, offset=t)
    keys = torch.cat((cache.keys, attn.rotary_emb.rotate(k, offset=t)), dim=-2)
    values = torch.cat((cache.values, v), dim=-2)

    # 2. selected blocks plus the own block up to t
    fine_out = _fine_step(attn, q_rot, keys, values, selection, t)

    # 3. sliding window t - window ... t
    lo = max(0, t - attn.sliding_window_size)
    sliding_out = _attend_group(attn, q_rot, keys[:, :, lo:], values[:, :, lo:])

    out = attn.combine(x, compressed_out, fine_out, sliding_out)
    return out, NSACache(keys, values, ck, cv, tail_k, tail_v)


def _attend_group(attn, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None, logit_mult: Tensor | None = None) -> Tensor:
    """q (b, H, 1, d) against k, v (b, H', j, d) with H a multiple of H'; masks broadcast as (b, H', G, 1, j)."""
    b, h, _, d = q.shape
    hk = k.shape[1]
    qg = q.view(b, hk, h // hk, 1, d)
    logits = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * attn.scale
    if logit_mult is not None:
        logits = logits * logit_mult
    if allowed is None:
        allowed = torch.ones_like(logits, dtype=torch.bool)
    out = masked_attention(logits, allowed.expand_as(logits), v[:, :, None])
    return out.reshape(b, h, 1, v.shape[-1])


def _fine_step(attn, q: Tensor, keys: Tensor, values: Tensor, selection, t: int) -> Tensor:
    sel = attn.selection_block_size
    own_start = (t // sel) * sel
    own_k, own_v = keys[:, :, own_start:], values[:, :, own_start:]
    if selection is None:
        return _attend_group(attn, q, own_k, own_v)
    idx, valid = selection.indices, selection.valid  # (b, hs, 1, S)
    b, hs, _, S = idx.shape
    hk = keys.shape[1]
    if hs != hk:  # one selection per query head: give each query head its kv head's keys
        keys, values = (x.repeat_interleave(hs // hk, dim=1) for x in (keys, values))
        own_k, own_v = (x.repeat_interleave(hs // hk, dim=1) for x in (own_k, own_v))
    num_blocks = own_start // sel  # selectable blocks all end before the own block
    safe = torch.where(valid, idx, torch.zeros_like(idx)).clamp(max=max(num_blocks - 1, 0))
    blocks_k = keys[:, :, : num_blocks * sel].unflatten(2, (num_blocks, sel))
    blocks_v = values[:, :, : num_blocks * sel].unflatten(2, (num_blocks, sel))
    gather = safe[:, :, 0, :, None, None]
    sel_k = blocks_k.gather(2, gather.expand(-1, -1, -1, sel, keys.shape[-1])).flatten(2, 3)
    sel_v = blocks_v.gather(2, gather.expand(-1, -1, -1, sel, values.shape[-1])).flatten(2, 3)
    all_k, all_v = torch.cat((sel_k, own_k), dim=-2), torch.cat((sel_v, own_v), dim=-2)
    own_len = own_k.shape[-2]
    allowed = torch.cat((valid[:, :, 0].repeat_interleave(sel, dim=-1), valid.new_ones(b, hs, own_len)), dim=-1)
    mult = None
    if selection.gates is not None:
        gates = selection.gates[:, :, 0].repeat_interleave(sel, dim=-1)
        mult = torch.cat((gates, gates.new_ones(b, hs, own_len)), dim=-1)[:, :, None, None]
    return _attend_group(attn, q, all_k, all_v, allowed[:, :, None, None], mult)
