"""Cached decoding for causal SparseAttention: a prefill that returns the cache, then steps that
append tokens one at a time, each through the module's own `attend` with a decoding step's
sequence descriptor (its queries after the cached keys), so a step computes what the parallel pass
computes for that query.

What the cache holds, and why (b batch, hk kv heads, t tokens so far, d head dim):
- keys (b, hk, t, d), rotated, and values (b, hk, t, d): the selection branch may pick any
  earlier block and the sliding window reaches the last `window` tokens, so every past key and
  value stays reachable;
- compressed_keys / compressed_values (b, hk, c, d): the compression windows completed so far
  (memory tokens are parameters and are not copied in);
- tail_keys / tail_values (b, hk, r, d), unrotated: the tokens of the compression window being
  filled, its overlap with the previous window included (zeros before the sequence start).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_core.model.attention import BranchKeys
from nsa_core.model.compression import with_memory
from nsa_core.ops.seqs import Seqs


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
        """From a whole prompt's unrotated k, rotated k, v (b, hk, n, d) and its compressed ck, cv."""
        cfg = attn.config
        n = k.shape[-2]
        start = (n // cfg.stride) * cfg.stride
        overlap = cfg.compress_block_size - cfg.stride
        tail_k, tail_v = (F.pad(t, (0, 0, overlap, 0))[:, :, start:] for t in (k, v))
        return cls(k_rot, v, ck, cv, tail_k, tail_v)

    def check_for(self, attn, inp: Tensor) -> None:
        expected = (inp.shape[0], attn.kv_heads)
        if tuple(self.keys.shape[:2]) != expected or self.keys.shape[-1] != attn.dim_head:
            raise ValueError(
                f"cache does not fit this module and input: keys have shape {tuple(self.keys.shape)}, "
                f"expected (batch={expected[0]}, kv_heads={expected[1]}, t, dim_head={attn.dim_head})"
            )


def run_with_cache(attn, inp: Tensor, cache: NSACache | None, return_cache: bool):
    """Prefill (cache None) or decode the tokens of inp (b, n, dim) one after the other."""
    if not attn.config.causal:
        raise ValueError("cache / return_cache need a causal module (causal=True)")
    if cache is None:
        out, cache = prefill(attn, inp)
        return out, cache
    if not isinstance(cache, NSACache):
        raise TypeError(f"cache must be an NSACache (returned with return_cache=True), got {type(cache).__name__}")
    cache.check_for(attn, inp)
    outs = []
    for i in range(inp.shape[1]):
        out, cache = decode_step(attn, inp[:, i : i + 1], cache)
        outs.append(out)
    out = torch.cat(outs, dim=1)
    return (out, cache) if return_cache else out


def prefill(attn, inp: Tensor) -> tuple[Tensor, NSACache]:
    """The parallel pass over a prompt, keeping what later steps need."""
    x = attn.norm(inp)
    q, k, v = attn.project(x)
    keys = attn.keys_of(k, v)
    out = attn.attend(x, q, keys, Seqs.batch(inp.shape[1]))
    mem = attn.config.num_compressed_mem_kv
    cache = NSACache.from_prefill(attn, k, keys.rotated_k, v, keys.compressed_k[:, :, mem:], keys.compressed_v[:, :, mem:])
    return out, cache


def decode_step(attn, inp: Tensor, cache: NSACache) -> tuple[Tensor, NSACache]:
    """One token inp (b, 1, dim) at position t = cache.seq_len -> (output (b, 1, dim), the grown cache)."""
    cfg = attn.config
    t = cache.seq_len
    seqs = Seqs.step(1, t)
    x = attn.norm(inp)
    q, k, v = attn.project(x)  # (b, h, 1, d), (b, hk, 1, d)
    ck_all, cv_all = with_memory(attn.compress_mem_kv, cache.compressed_keys, cache.compressed_values)
    keys_rot = torch.cat((cache.keys, attn.rotate(k, seqs.query_positions(k.device))), dim=-2)
    values = torch.cat((cache.values, v), dim=-2)
    out = attn.attend(x, q, BranchKeys(ck_all, cv_all, keys_rot, values), seqs)

    tail_k = torch.cat((cache.tail_keys, k), dim=-2)
    tail_v = torch.cat((cache.tail_values, v), dim=-2)
    ck, cv = cache.compressed_keys, cache.compressed_values
    if tail_k.shape[-2] == cfg.compress_block_size:
        new_k, new_v = attn.compress_windows(tail_k[:, :, None], tail_v[:, :, None])
        ck, cv = torch.cat((ck, new_k), dim=-2), torch.cat((cv, new_v), dim=-2)
        tail_k, tail_v = tail_k[:, :, cfg.stride :], tail_v[:, :, cfg.stride :]
    return out, NSACache(keys_rot, values, ck, cv, tail_k, tail_v)

