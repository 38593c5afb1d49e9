"""compressed_selection: the compressed branch and the block selection as one op. Whole sequences
take compressed_attention and select_blocks (the same numbers); a decoding step over a cache's pages
takes the fused kernel (backend="triton", through the interpreter) or its twin (backend="torch"),
decided once per call, with the same blocks and outputs; and the step's errors."""

import importlib

import pytest
import torch

from helpers import randomize_
from nsa_core import SparseAttention
from nsa_core.ops import Seqs, compressed_attention, select_blocks
from nsa_core.ops.compressed_selection import compressed_selection
from nsa_core.ops.dispatch import kernel_unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = kernel_unavailable_reason(torch.device(DEVICE)) is None
op = importlib.import_module("nsa_core.ops.compressed_selection")  # the module: nsa_core.ops exports the function


def module(**changes):
    kwargs = dict(dim=48, dim_head=16, heads=6, kv_heads=2, sliding_window_size=20, compress_block_size=16,
                  compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=3, causal=True,
                  num_compressed_mem_kv=2)
    return randomize_(SparseAttention(**{**kwargs, **changes}), std=0.2).to(DEVICE)


def test_whole_sequences_are_the_two_ops():
    attn = module()
    q, k, v = attn.project(attn.norm(torch.randn(2, 45, 48, device=DEVICE)))
    keys = attn.keys_of(k, v)
    common = dict(num_memory=2, causal=True, scale=attn.scale, backend="torch")
    out, selection = compressed_selection(q, keys.compressed_k, keys.compressed_v, None,
                                          attn.selection_rule, **common)
    want = compressed_attention(q, keys.compressed_k, keys.compressed_v, stride=8, **common)
    want_sel = select_blocks(q, keys.compressed_k[:, :, 2:], attn.selection_rule, backend="torch")
    assert torch.equal(out, want)
    assert torch.equal(selection.indices, want_sel.indices) and torch.equal(selection.valid, want_sel.valid)


def step_inputs(attn, lengths=(37, 22), K=2):
    """A prefilled cache and a step's (q, keys, seqs) as attend gets them."""
    x = torch.randn(len(lengths), max(lengths) + K, 48, device=DEVICE)
    with torch.no_grad():
        cache = attn.new_cache(len(lengths), 64)
        attn(x[:, : max(lengths)], cache=cache, lengths=torch.tensor(lengths, device=DEVICE))
        q = attn.project(attn.norm(x[:, -K:]))[0]
    return q, cache.branch_keys(), Seqs.step(cache.lengths, K, cache.capacity)


@pytest.mark.skipif(not KERNELS, reason="kernels cannot run here")
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("changes", [dict(), dict(importance_score="summed_probs", num_forced_initial_blocks=1,
                                                  num_forced_local_blocks=1),
                                     dict(query_heads_share_selected_kv=False)])
def test_step_kernel_equals_twin(changes, monkeypatch):
    attn = module(**changes)
    q, keys, seqs = step_inputs(attn)
    ran = []
    twin = op.step_compressed_selection_reference
    monkeypatch.setattr(op, "step_compressed_selection_reference", lambda *a, **k: ran.append("twin") or twin(*a, **k))

    def call(backend):
        return compressed_selection(q, keys.compressed_k, keys.compressed_v, None,
                                    attn.selection_rule, num_memory=2, scale=attn.scale, seqs=seqs, backend=backend)

    with torch.no_grad():
        out, selection = call("triton")
        assert ran == []
        want, want_sel = call("torch")
        assert ran == ["twin"]
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert selection.indices.shape == want_sel.indices.shape and selection.gates is None
    assert torch.equal(selection.indices, want_sel.indices) and torch.equal(selection.valid, want_sel.valid)
    torch.testing.assert_close(selection.probs, want_sel.probs, atol=1e-6, rtol=1e-5)


def test_step_errors():
    attn = module()
    q, keys, seqs = step_inputs(attn, K=1)
    rule = attn.selection_rule
    with pytest.raises(ValueError, match="causal"):
        compressed_selection(q, keys.compressed_k, keys.compressed_v, None, rule, num_memory=2,
                             causal=False, seqs=seqs)
    with pytest.raises(TypeError, match="PooledBlockKeys"):
        compressed_selection(q, keys.compressed_k, keys.compressed_v, torch.zeros(2, 2, 8, 16, device=DEVICE), rule,
                             num_memory=2, seqs=seqs)
    with pytest.raises(ValueError, match="num_memory"):
        compressed_selection(q, keys.compressed_k, keys.compressed_v, None, rule, num_memory=0, seqs=seqs)
