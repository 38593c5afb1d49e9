"""The kernel path's compressed attention (one SDPA call) and pooled block scoring equal the
PyTorch path (float64, so no near-tie can flip a selected block)."""

import importlib

import pytest
import torch

from helpers import output_and_grads, randomize_, rel_err
from nsa_core import SparseAttention
from nsa_core.kernels import compressed_sdpa, split_staircase
from nsa_core.kernels.compressed_sdpa import compressed_attention_sdpa
from nsa_core.reference.compressed_attention import compressed_attention_chunked, compressed_attention_reference


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


def assert_shard_equals_reference(gen, G, T, C, memory, stride, offset):
    """Queries at offset ... offset + T - 1 through the kernel path's staircase: output and the
    gradients of q, ck, cv equal the chunked reference in float64."""
    HKV = 2 if G < 16 else 1
    q = torch.randn(2, G * HKV, T, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    ck = torch.randn(2, HKV, memory + C, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    cv = torch.randn(2, HKV, memory + C, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    expected = compressed_attention_chunked(q, ck, cv, memory, stride, True, 0.3, query_offset=offset)
    got = compressed_attention_sdpa(q, ck, cv, memory, stride, True, 0.3, q_offset=offset)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(got, (q, ck, cv), g), torch.autograd.grad(expected, (q, ck, cv), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride, C", [(4, 9), (3, 4), (1, 6)])  # C < (last position) / stride: queries past the staircase
@pytest.mark.parametrize("offset, T", [(6, 13), (21, 16), (40, 3)])
@pytest.mark.parametrize("G, memory, flash", [(1, 1, False), (3, 2, False), (3, 2, True), (16, 1, True)])
def test_offset_staircase_equals_reference(monkeypatch, stride, C, offset, T, G, memory, flash):
    """Queries at positions offset ... offset + T - 1 (a shard): output and gradients in float64.
    flash: grouped kv heads passed as they are (as to the flash kernel), not repeated."""
    if flash:
        monkeypatch.setattr(compressed_sdpa, "can_use_flash_attention", lambda params: True)
    gen = torch.Generator().manual_seed(offset * 100 + T)
    assert_shard_equals_reference(gen, G, T, C, memory, stride, offset)


@pytest.mark.parametrize("stride, offset, T, C", [(4, 40, 3, 30), (3, 61, 7, 21), (3, 61, 7, 40), (5, 123, 9, 30)])
@pytest.mark.parametrize("G, memory", [(1, 1), (3, 2), (16, 1)])
def test_split_staircase_equals_reference(monkeypatch, stride, offset, T, C, G, memory):
    """A late shard (first row >= SPLIT_FROM_ROWS x its rows) splits its staircase into a rectangle and a causal
    triangle merged by log-sum-exp; with the pieces' PyTorch twin, output and gradients equal the
    reference in float64 (C = 21 at offset 61: the last two queries see every block)."""
    calls = []

    def spy(*args):
        calls.append(args)
        return split_staircase.math_partial

    monkeypatch.setattr(compressed_sdpa, "_split_partial", spy)
    gen = torch.Generator().manual_seed(offset * 10 + G)
    assert_shard_equals_reference(gen, G, T, C, memory, stride, offset)
    assert len(calls) == 1


def test_split_staircase_not_taken_for_early_shards(monkeypatch):
    """A shard whose first row is before SPLIT_FROM_ROWS x its rows keeps the one lower-right call."""
    monkeypatch.setattr(compressed_sdpa, "_split_partial", lambda *a: pytest.fail("split taken"))
    q, ck, cv = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    assert compressed_sdpa.SPLIT_FROM_ROWS * 4 > 3
    compressed_attention_sdpa(q, ck, cv, 1, 4, True, 0.3, q_offset=12)  # first row 3, rows 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("G", [4, 16])
def test_split_staircase_gpu(G):
    """The cuDNN split of a late shard (offset 6144 + 5 of 8192, rows 128): output and gradients within
    3x the bf16 reference's own error of float64, and the split is the path taken."""
    assert compressed_sdpa._split_partial(torch.randn(1, 16 * G, 8, 64, device="cuda", dtype=torch.bfloat16),
                                          *(torch.randn(1, 4, 8, 64, device="cuda", dtype=torch.bfloat16)
                                            for _ in range(2))) is split_staircase.cudnn_partial
    gen = torch.Generator().manual_seed(G)
    HKV, T, offset, stride, memory = 4, 2043, 6149, 16, 1
    C = (offset + T - 32) // stride + 1
    exact_in = [torch.randn(1, G * HKV, T, 64, generator=gen, dtype=torch.float64).cuda().requires_grad_()]
    exact_in += [torch.randn(1, HKV, memory + C, 64, generator=gen, dtype=torch.float64).cuda().requires_grad_()
                 for _ in range(2)]
    g = torch.randn(1, G * HKV, T, 64, generator=gen, dtype=torch.float64).cuda()
    low_in = [t.detach().to(torch.bfloat16).requires_grad_() for t in exact_in]
    same_in = [t.detach().to(torch.bfloat16).requires_grad_() for t in exact_in]

    def run(fn, inputs, grad):
        out = fn(*inputs, memory, stride, True, 0.125, query_offset=offset) if fn is compressed_attention_chunked \
            else fn(*inputs, memory, stride, True, 0.125, q_offset=offset)
        return [out, *torch.autograd.grad(out, inputs, grad)]

    exact = run(compressed_attention_chunked, exact_in, g)
    same_dtype = run(compressed_attention_chunked, same_in, g.to(torch.bfloat16))
    got = run(compressed_attention_sdpa, low_in, g.to(torch.bfloat16))
    for a, b, e in zip(got, same_dtype, exact):
        assert (a.double() - e).norm() <= 3 * (b.double() - e).norm() + 1e-6 * e.norm()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # flash (GQA as is) / memory-efficient (kv repeated)
@pytest.mark.parametrize("G", [1, 4, 16])
def test_offset_staircase_gpu(dtype, G):
    """A shard at offset 6147 (not a multiple of the stride 16) of 8192 tokens, within 3x the reference's own error."""
    gen = torch.Generator().manual_seed(G)
    HKV, T, offset, stride, memory = 4, 2045, 6147, 16, 1
    C = (offset + T - 32) // stride + 1  # windows of 32 every 16: the last queries see every block
    q = torch.randn(1, G * HKV, T, 64, generator=gen, dtype=torch.float64).cuda()
    ck, cv = (torch.randn(1, HKV, memory + C, 64, generator=gen, dtype=torch.float64).cuda() for _ in range(2))
    exact = compressed_attention_chunked(q, ck, cv, memory, stride, True, 0.125, query_offset=offset)
    low = [t.to(dtype) for t in (q, ck, cv)]
    same_dtype = compressed_attention_chunked(*low, memory, stride, True, 0.125, query_offset=offset)
    got = compressed_attention_sdpa(*low, memory, stride, True, 0.125, q_offset=offset)
    limit = 3 * (same_dtype.double() - exact).abs().max().item() + 1e-5
    assert (got.double() - exact).abs().max().item() <= limit


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


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("compress_block", [8, 16])  # 16: the last queries see every compressed block
def test_shard_fast_path_equals_exact(monkeypatch, rank, compress_block):
    """A sequence-parallel shard (rank of 3, offsets 23 and 46: not multiples of the stride) through
    both ops' kernel paths equals their PyTorch paths: output, and gradients of the shard, of the other
    ranks' keys and values and of the parameters."""
    from nsa_core.model.sequence_parallel import StandInGather, shard_forward, shard_plan

    kwargs = dict(dim=32, dim_head=8, heads=6, kv_heads=2, sliding_window_size=5, compress_block_size=compress_block,
                  compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=3, causal=True,
                  num_compressed_mem_kv=2)
    attn = randomize_(SparseAttention(**kwargs), std=0.3).double()
    gen = torch.Generator().manual_seed(rank)
    n, nl = 69, 23
    plan = shard_plan(attn, n, 3, rank, "contiguous")
    x = torch.randn(2, nl, 32, dtype=torch.float64, generator=gen)
    grad = torch.randn(x.shape, dtype=torch.float64, generator=gen)

    def run():
        others = torch.Generator().manual_seed(7)  # the same other ranks' rows in both runs
        gather = StandInGather(plan, lambda shape: torch.randn(shape, dtype=torch.float64, generator=others)
                               .requires_grad_())
        xs = x.clone().requires_grad_()
        out = shard_forward(attn, xs, plan, gather)
        params = [p for p in attn.parameters() if p.requires_grad]
        return out, torch.autograd.grad(out, [xs, *gather.leaves, *params], grad, allow_unused=True)

    exact_out, exact_grads = run()
    for op in ("compressed_attention", "block_selection"):
        monkeypatch.setattr(importlib.import_module(f"nsa_core.ops.{op}"), "use_kernels", lambda *a, **k: True)
    fast_out, fast_grads = run()
    assert rel_err(fast_out, exact_out) < 1e-10
    for a, b in zip(fast_grads, exact_grads):
        assert (a is None) == (b is None)
        if b is not None and b.numel() and b.abs().max() > 0:
            assert rel_err(a, b) < 1e-8
