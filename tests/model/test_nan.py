"""NaN in the input (the contract the README states): on the PyTorch path a NaN token at position t
never changes an output before t, every output from t on is NaN, and cached decoding agrees."""

import pytest
import torch

from helpers import randomize_
from nsa_core import SparseAttention

CONFIGS = [
    dict(sliding_window_size=4, compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=8,
         num_selected_blocks=2),
    dict(sliding_window_size=3, compress_block_size=4, selection_block_size=2, num_selected_blocks=2,
         interpolated_importance_score=True, query_heads_share_selected_kv=False),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_at_t_leaves_earlier_outputs_alone(config, poison):
    attn = randomize_(SparseAttention(dim=64, dim_head=16, heads=6, kv_heads=2, causal=True, **config), std=0.2)
    x = torch.randn(2, 45, 64)
    bad = x.clone()
    bad[:, 20, 5] = poison
    with torch.no_grad():
        clean, out = attn(x), attn(bad)
        first, cache = attn(bad[:, :10], return_cache=True)
        decoded = torch.cat([first] + [attn(bad[:, t : t + 1], cache=cache) for t in range(10, 45)], dim=1)
    assert torch.equal(out[:, :20], clean[:, :20])
    assert out[:, 20:].isnan().all()
    assert (decoded[:, :20] - out[:, :20]).abs().max() <= 1e-5 and decoded[:, 20:].isnan().all()


def test_autocast_bf16_trains():
    """Under autocast float32 parameters (memory tokens, positions) meet bf16 activations: the module
    runs forward and backward (a regression: the ops' dtype checks refused the mix)."""
    attn = randomize_(SparseAttention(dim=64, dim_head=16, heads=6, kv_heads=2, causal=True, **CONFIGS[0]), std=0.2)
    x = torch.randn(2, 40, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attn.parameters())
