"""The seeds' compress tests (seed 000) as written, and every network of compress_networks."""

import pytest
import torch
from einops.layers.torch import Rearrange
from torch import nn

from helpers import randomize_
from nsa_core import SparseAttention
from nsa_core import compress_networks as cn

SEEDS_MODULE = dict(dim=512, dim_head=64, heads=8, sliding_window_size=2, compress_block_size=4,
                    selection_block_size=4, num_selected_blocks=2)


def test_alternative_compress_mlp():
    dim_head = 64
    compress_dim = dim_head * 4
    compress_mlp = nn.Sequential(
        Rearrange("b h w n d -> b h w (n d)"),
        nn.Linear(compress_dim, compress_dim),
        nn.SiLU(),
        nn.Linear(compress_dim, compress_dim),
        nn.SiLU(),
        nn.Linear(compress_dim, dim_head),
    )
    attn = SparseAttention(**SEEDS_MODULE, compress_mlp=compress_mlp)
    tokens = torch.randn(2, 31, 512)
    attended = attn(tokens)
    assert tokens.shape == attended.shape


def test_compress_networks():
    attn = SparseAttention(**SEEDS_MODULE, compress_mlp=cn.AttentionPool(64, 4))
    tokens = torch.randn(2, 31, 512)
    assert attn(tokens).shape == tokens.shape


def test_group_mlp():
    attn = SparseAttention(**SEEDS_MODULE, compress_mlp=cn.GroupedMLP(64, 4, 8))
    tokens = torch.randn(2, 31, 512)
    assert attn(tokens).shape == tokens.shape


# kv_heads = 2 below: networks with per-head weights are built for the kv heads
NETWORKS = {
    "conv_linear": lambda: cn.ConvLinearCompress(2, 16, 4),
    "attention_pool": lambda: cn.AttentionPool(16, 4),
    "grouped_mlp": lambda: cn.GroupedMLP(16, 4, 2, expand_factor=1.5),
    "single_projection": lambda: cn.SingleProjection(16, 4),
    "single_projection_heads": lambda: cn.SingleProjection(16, 4, heads=2),
    "compress_transformer": lambda: cn.CompressTransformer(2, 32, 4),
    "gelu_mlp": lambda: cn.GELUCompressMLP(16, 4),
    "bottleneck_conv": lambda: cn.BottleneckConvCompress(2, 16, 4, reduction_factor=4),
    "scaled_attention_pool": lambda: cn.ScaledAttentionPool(16, 4, learned_temperature=True),
    "residual_grouped_mlp": lambda: cn.ResidualGroupedMLP(16, 4, 2, dropout=0.1),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_shape_and_gradients(name):
    net = randomize_(NETWORKS[name](), std=0.2)
    windows = torch.randn(3, 2, 5, 4, 16, requires_grad=True)
    out = net(windows)
    assert out.shape == (3, 2, 5, 16)
    out.sum().backward()
    assert windows.grad is not None and torch.isfinite(windows.grad).all()


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_as_compress_mlp(name):
    attn = SparseAttention(dim=48, dim_head=16, heads=4, kv_heads=2, sliding_window_size=3, compress_block_size=4,
                           selection_block_size=4, num_selected_blocks=2, causal=True, compress_mlp=NETWORKS[name]())
    randomize_(attn, std=0.2)
    x = torch.randn(2, 23, 48, requires_grad=True)
    out = attn(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    for pname, p in attn.k_compress.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient reached k_compress.{pname}"


def test_network_windows_are_independent():
    """Changing one window changes only that window's compressed token."""
    net = randomize_(cn.BottleneckConvCompress(2, 16, 4), std=0.2)
    windows = torch.randn(1, 2, 6, 4, 16)
    changed = windows.clone()
    changed[:, :, 3] += 1.0
    diff = (net(windows) - net(changed)).abs().amax(dim=(0, 1, 3))
    assert diff[3] > 0 and torch.all(diff[[0, 1, 2, 4, 5]] == 0)


def test_scaled_attention_pool_temperature():
    pool = cn.ScaledAttentionPool(16, 4, temperature=1.0)
    plain = cn.AttentionPool(16, 4)
    windows = torch.randn(2, 2, 3, 4, 16)
    torch.testing.assert_close(pool(windows), plain(windows))
    with pytest.raises(ValueError, match="temperature"):
        cn.ScaledAttentionPool(16, 4, temperature=0.0)


def test_bad_network_arguments():
    with pytest.raises(ValueError, match="reduction_factor"):
        cn.BottleneckConvCompress(2, 16, 4, reduction_factor=3)
    with pytest.raises(ValueError, match="dropout"):
        cn.ResidualGroupedMLP(16, 4, 2, dropout=1.5)
    with pytest.raises(ValueError, match="heads"):
        cn.ConvLinearCompress(0, 16, 4)


def test_bad_network_output_is_named():
    bad = nn.Sequential(Rearrange("b h w n d -> b h w (n d)"), nn.Linear(64, 7))
    attn = SparseAttention(dim=32, dim_head=16, heads=2, sliding_window_size=2, compress_block_size=4,
                           selection_block_size=4, num_selected_blocks=1, compress_mlp=bad)
    with pytest.raises(ValueError, match="compress_mlp must map"):
        attn(torch.randn(1, 9, 32))
