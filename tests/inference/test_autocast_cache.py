"""A cached pass under autocast (bf16 activations, float32 parameters), as a user runs generation
with mixed precision: the prefill and the steps write the cache in its dtype (the page writes refuse
a silent conversion) and decode what the parallel pass computes, within that pass's own bf16 error."""

import torch

from helpers import randomize_
from nsa_core import SparseAttention


def test_cached_pass_under_autocast_matches_parallel():
    """On the PyTorch path (the kernels' decode under the interpreter takes ~45 s here; the kernel path's
    writes are the same op, tests/kernels/test_page_write.py)."""
    torch.manual_seed(0)
    attn = randomize_(SparseAttention(dim=32, dim_head=16, heads=6, kv_heads=2, sliding_window_size=8,
                                      compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=16,
                                      num_selected_blocks=2, causal=True, num_compressed_mem_kv=2, backend="torch"), std=0.3)
    x = torch.randn(2, 41, 32)
    with torch.no_grad():
        exact = attn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            parallel = attn(x)
            out, cache = attn(x[:, :37], return_cache=True)
            steps = [attn(x[:, i : i + 1], cache=cache) for i in range(37, 41)]
    assert cache.dtype == torch.bfloat16 and cache.ck_pages.dtype == torch.bfloat16
    decoded = torch.cat([out, *steps], dim=1)
    own = (parallel.float() - exact).abs().max().item()
    assert (decoded.float() - exact).abs().max().item() <= 3 * own + 1e-3
