"""Same weights, same input: nsa_core.SparseAttention equals native-sparse-attention-pytorch 0.2.3
(its pure-PyTorch path) in outputs and in the gradients of the input and every parameter."""

import pytest
import torch

from helpers import forward_backward, randomize_, rel_err
from nsa_core import SparseAttention
from nsa_core.checkpoint.lucidrains import from_lucidrains, to_lucidrains

oracle = pytest.importorskip("native_sparse_attention_pytorch")

# (heads, kv_heads, compress_block, stride, selection_block, selected, memory, window, share, diff_topk)
CONFIGS = [
    (4, 4, 4, 4, 4, 2, 1, 2, True, False),  # group 1
    (4, 2, 4, 4, 4, 2, 2, 3, True, True),  # group 2, two memory tokens
    (6, 2, 8, 4, 8, 3, 1, 5, True, False),  # group 3, overlapping compression
    (8, 1, 8, 4, 16, 2, 3, 4, False, False),  # group 8, per-head selection
    (6, 2, 4, 2, 8, 2, 1, 3, False, True),  # per-head selection with diff top-k
    (8, 1, 6, 3, 6, 4, 2, 7, True, True),  # block 6 stride 3, group 8
]
LENGTHS = [1, 7, 33, 77]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_same_outputs_and_gradients(config, causal, seq_len):
    heads, kv_heads, block, stride, sel, selected, mem, window, share, diff = config
    kwargs = dict(
        dim=40, dim_head=16, heads=heads, kv_heads=kv_heads, sliding_window_size=window,
        compress_block_size=block, selection_block_size=sel, num_selected_blocks=selected,
        num_compressed_mem_kv=mem, causal=causal, query_heads_share_selected_kv=share, use_diff_topk=diff,
    )
    theirs = randomize_(oracle.SparseAttention(compress_block_sliding_stride=stride, **kwargs), seed=seq_len)
    ours = SparseAttention(compress_block_sliding_stride=stride, backend="torch", **kwargs)
    ours.load_state_dict(from_lucidrains(theirs.state_dict()), strict=True)

    x = torch.randn(2, seq_len, 40)
    grad_out = torch.randn_like(x)  # the output has the input's shape
    out_theirs, x_grad_theirs, grads_theirs = forward_backward(theirs, x, grad_out)
    out_ours, x_grad_ours, grads_ours = forward_backward(ours, x, grad_out)
    assert rel_err(out_ours, out_theirs) < 2e-5
    assert rel_err(x_grad_ours, x_grad_theirs) < 5e-5
    for name, grad in grads_ours.items():
        g_theirs = grads_theirs[name]
        if g_theirs is None or g_theirs.abs().max() == 0:  # e.g. compression MLPs before any full window
            assert grad is None or grad.abs().max() == 0, name
            continue
        assert grad is not None, f"no gradient reached {name}"
        assert rel_err(grad, g_theirs) < 5e-5, name


def test_state_dict_round_trip_to_oracle():
    kwargs = dict(dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=2, compress_block_size=4,
                  selection_block_size=4, num_selected_blocks=2, causal=True)
    ours = randomize_(SparseAttention(**kwargs))
    theirs = oracle.SparseAttention(compress_block_sliding_stride=4, **kwargs)
    theirs.load_state_dict(to_lucidrains(ours.state_dict()), strict=True)
    x = torch.randn(1, 19, 32)
    assert rel_err(ours(x), theirs(x)) < 2e-5


def test_oracle_cached_decoding_drifts_ours_does_not():
    """The weakness we fix: with random weights the oracle's cached outputs leave its parallel pass."""
    kwargs = dict(dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=2, compress_block_size=4,
                  selection_block_size=4, num_selected_blocks=2, causal=True)
    theirs = randomize_(oracle.SparseAttention(compress_block_sliding_stride=4, **kwargs))
    ours = SparseAttention(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 12, 32)

    def decode(module):
        out, cache = module(x[:, :1], return_cache=True)
        outs = [out]
        for t in range(1, x.shape[1]):
            out, cache = module(x[:, t : t + 1], cache=cache, return_cache=True)
            outs.append(out)
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        assert rel_err(decode(theirs), theirs(x)) > 1e-3
        assert rel_err(decode(ours), ours(x)) < 1e-5
