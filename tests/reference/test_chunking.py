"""Working over chunks of queries (for memory linear in the sequence) changes no number."""

import pytest
import torch

from helpers import output_and_grads, randomize_, rel_err
from nsa_core import SparseAttention
from nsa_core.reference import compressed_attention, selection


@pytest.mark.parametrize("causal, diff, share", [(True, True, True), (False, False, False), (True, False, False)])
def test_chunked_compression_and_selection_equal_whole(monkeypatch, causal, diff, share):
    kwargs = dict(dim=32, dim_head=8, heads=6, kv_heads=2, sliding_window_size=3, compress_block_size=8,
                  compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=2, causal=causal,
                  use_diff_topk=diff, query_heads_share_selected_kv=share)
    attn = randomize_(SparseAttention(**kwargs), std=0.3)
    x = torch.randn(2, 45, 32)

    whole_out, whole_grads = output_and_grads(attn, x)
    for module in (compressed_attention, selection):
        monkeypatch.setattr(module, "query_chunk_size", lambda *a, **k: 7)
    chunked_out, chunked_grads = output_and_grads(attn, x)
    assert rel_err(chunked_out, whole_out) < 1e-6
    assert len(chunked_grads) == len(whole_grads)
    for a, b in zip(chunked_grads, whole_grads):
        assert rel_err(a, b) < 1e-5
