"""The decode timing's set-up (nsa_cli/support/decode_speed.py): a random-filled cache with rows at
the same or at ragged positions, and the timed steps leaving the cache where they found it."""

import pytest
import torch

from nsa_cli.support.decode_speed import _nsa_steps, decode_benchmark
from nsa_core import NSAConfig, SparseAttention

CFG = dict(dim=32, dim_head=8, heads=6, kv_heads=2, sliding_window_size=5, compress_block_size=8,
           compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=2, causal=True)


def test_fill_random_ragged_rows():
    attn = SparseAttention(**CFG)
    cache = attn.new_cache(6, 64)
    cache.fill_random(40, ragged=4)
    assert cache.lengths.tolist() == [40, 39, 38, 37, 40, 39]
    assert cache.filled == 40
    cache.fill_random(40)
    assert cache.lengths.tolist() == [40] * 6
    for bad in (-1, 41, True, 2.0):
        with pytest.raises(ValueError, match="ragged"):
            cache.fill_random(40, ragged=bad)


@pytest.mark.parametrize("ragged", [0, 4])
def test_timed_cycle_decodes_a_whole_compression_cycle_and_rewinds(ragged):
    torch.manual_seed(0)
    attn = SparseAttention(**CFG).eval()
    cache = attn.new_cache(5, 64)
    cache.fill_random(33, ragged=ragged)
    before = cache.lengths.clone()
    x = torch.randn(5, 1, 32)
    with torch.no_grad():
        out = _nsa_steps(attn, cache, x)()
    assert out.shape == (5, 1, 32) and torch.isfinite(out).all()
    assert torch.equal(cache.lengths, before) and cache.filled == 33


def test_decode_benchmark_ragged_on_cpu():
    cfg = NSAConfig(**{**CFG, "causal": True})
    rows = decode_benchmark(cfg, [40], [3], device="cpu", dtype=torch.float32, ragged=True)
    assert len(rows) == 1 and rows[0].nsa_ms > 0 and rows[0].dense_ms > 0 and rows[0].batch == 3
