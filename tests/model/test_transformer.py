import pytest
import torch

from helpers import randomize_
from nsa_core.model.transformer import Transformer


def make(use_sparse_attn=True, **kw):
    torch.manual_seed(0)
    return Transformer(num_tokens=50, dim=32, depth=2, dim_head=8, heads=4, kv_heads=2, use_sparse_attn=use_sparse_attn,
                       sparse_attn_kwargs=dict(sliding_window_size=4, compress_block_size=4, selection_block_size=4,
                                               num_selected_blocks=2), **kw)


def test_greedy_sampling_same_with_and_without_cache():
    model = randomize_(make(), std=0.3).eval()
    prompt = torch.randint(0, 50, (2, 7))
    plain = model.sample(prompt, 30, temperature=0.0, use_cache_kv=False)
    cached = model.sample(prompt, 30, temperature=0.0, use_cache_kv=True)
    assert plain.shape == (2, 23)
    assert torch.equal(plain, cached)


def test_loss_and_gradients():
    for sparse in (True, False):
        model = make(use_sparse_attn=sparse)
        ids = torch.randint(0, 50, (2, 19))
        loss = model(ids, return_loss=True)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_sampling_with_temperature_gives_valid_tokens():
    model = make()
    out = model.sample(torch.randint(0, 50, (1, 3)), 10, temperature=1.0, use_cache_kv=True)
    assert out.shape == (1, 7) and out.min() >= 0 and out.max() < 50


def test_cache_needs_causal_dense_layers_cache_too():
    dense = randomize_(make(use_sparse_attn=False), std=0.3).eval()
    prompt = torch.randint(0, 50, (1, 3))
    assert torch.equal(dense.sample(prompt, 9, temperature=0.0, use_cache_kv=True),
                       dense.sample(prompt, 9, temperature=0.0, use_cache_kv=False))
    with pytest.raises(ValueError, match="use_cache_kv needs causal"):
        make(use_sparse_attn=False, causal=False).sample(prompt, 5, use_cache_kv=True)
