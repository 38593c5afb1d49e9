"""The kernel path's compressed attention (one SDPA call) and pooled block scoring equal the
PyTorch path (float64, so no near-tie can flip a selected block)."""

import importlib

import pytest
import torch

from helpers import output_and_grads, randomize_, rel_err
from nsa_core import SparseAttention
from nsa_core.kernels.compressed_sdpa import compressed_attention_sdpa
from nsa_core.reference.compressed_attention import compressed_attention_reference


@pytest.mark.parametrize("causal, memory", [(True, 1), (True, 3), (False, 1), (False, 3)])
@pytest.mark.parametrize("T", [1, 5, 37, 64])
def test_staircase_sdpa_equals_reference(causal, memory, T):
    gen = torch.Generator().manual_seed(T)
    stride, G, HKV, C = 4, 3, 2, T // 4
    q = torch.randn(2, G * HKV, T, 8, dtype=torch.float64, generator=gen)
    ck = torch.randn(2, HKV, memory + C, 8, dtype=torch.float64, generator=gen)
    cv = torch.randn(2, HKV, memory + C, 6, dtype=torch.float64, generator=gen)
    expected, _ = compressed_attention_reference(q, ck, cv, memory, stride, causal, 0.3)
    torch.testing.assert_close(compressed_attention_sdpa(q, ck, cv, memory, stride, causal, 0.3), expected)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("share, diff, sel, memory", [(True, False, 8, 1), (False, True, 4, 2), (True, True, 16, 3)])
def test_module_fast_path_equals_exact(monkeypatch, causal, share, diff, sel, memory):
    kwargs = dict(dim=32, dim_head=8, heads=6, kv_heads=2, sliding_window_size=5, compress_block_size=8,
                  compress_block_sliding_stride=4, selection_block_size=sel, num_selected_blocks=3, causal=causal,
                  query_heads_share_selected_kv=share, use_diff_topk=diff, num_compressed_mem_kv=memory)
    attn = randomize_(SparseAttention(**kwargs), std=0.3).double()
    x = torch.randn(2, 71, 32, dtype=torch.float64)

    exact_out, exact_grads = output_and_grads(attn, x)
    for op in ("compressed_attention", "block_selection"):  # the kernel path of both ops, in float64
        monkeypatch.setattr(importlib.import_module(f"nsa_core.ops.{op}"), "use_kernels", lambda *a, **k: True)
    fast_out, fast_grads = output_and_grads(attn, x)
    assert rel_err(fast_out, exact_out) < 1e-10
    for a, b in zip(fast_grads, exact_grads):
        assert rel_err(a, b) < 1e-8
