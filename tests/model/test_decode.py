"""Cached one-token decoding equals the parallel pass, with random weights."""

import pytest
import torch

from helpers import randomize_
from nsa_core import NSACache, SparseAttention

# (heads, kv_heads, compress_block, stride, selection_block, selected, memory, window, share, interpolated, diff)
CONFIGS = [
    (4, 2, 4, 4, 4, 2, 1, 2, True, False, False),
    (6, 2, 8, 4, 8, 3, 2, 5, False, False, True),
    (6, 3, 4, 2, 8, 2, 1, 3, True, False, False),
    (4, 1, 8, 4, 2, 3, 2, 4, True, True, True),
    (6, 2, 4, 4, 1, 2, 1, 2, False, True, False),
    (8, 8, 5, 3, 6, 2, 1, 3, True, False, False),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("prefill", [1, 6])
def test_decoding_equals_parallel(config, prefill):
    heads, kv_heads, block, stride, sel, selected, mem, window, share, interp, diff = config
    attn = SparseAttention(
        dim=32, dim_head=8, heads=heads, kv_heads=kv_heads, sliding_window_size=window, compress_block_size=block,
        compress_block_sliding_stride=stride, selection_block_size=sel, num_selected_blocks=selected,
        num_compressed_mem_kv=mem, causal=True, query_heads_share_selected_kv=share,
        interpolated_importance_score=interp, use_diff_topk=diff,
    )
    randomize_(attn, std=0.2, seed=prefill)
    x = torch.randn(2, 41, 32)
    with torch.no_grad():
        parallel = attn(x)
        out, cache = attn(x[:, :prefill], return_cache=True)
        outs = [out]
        for t in range(prefill, x.shape[1]):
            out, cache = attn(x[:, t : t + 1], cache=cache, return_cache=True)
            outs.append(out)
    decoded = torch.cat(outs, dim=1)
    assert (decoded - parallel).abs().max() <= 1e-5
    assert isinstance(cache, NSACache) and cache.seq_len == x.shape[1]
    assert cache.compressed_keys.shape[-2] == x.shape[1] // stride


def test_decoding_several_tokens_at_once():
    attn = randomize_(SparseAttention(dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=3,
                                      compress_block_size=4, selection_block_size=4, num_selected_blocks=2, causal=True), std=0.2)
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        _, cache = attn(x[:, :9], return_cache=True)
        rest = attn(x[:, 9:], cache=cache)
        assert (rest - attn(x)[:, 9:]).abs().max() <= 1e-5


def test_cache_needs_causal_and_matching_shapes():
    attn = SparseAttention(dim=32, dim_head=8, heads=4, sliding_window_size=2, compress_block_size=4,
                           selection_block_size=4, num_selected_blocks=2, causal=False)
    with pytest.raises(ValueError, match="causal"):
        attn(torch.randn(1, 4, 32), return_cache=True)
    causal = SparseAttention(dim=32, dim_head=8, heads=4, sliding_window_size=2, compress_block_size=4,
                             selection_block_size=4, num_selected_blocks=2, causal=True)
    _, cache = causal(torch.randn(1, 4, 32), return_cache=True)
    with pytest.raises(ValueError, match="cache does not fit"):
        causal(torch.randn(2, 1, 32), cache=cache)
    with pytest.raises(TypeError, match="NSACache"):
        causal(torch.randn(1, 1, 32), cache=("not", "a cache"))
