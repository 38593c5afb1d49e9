"""Packed documents (cu_seqlens) through SparseAttention and the Transformer on the PyTorch path
(float64, random weights): outputs and every gradient equal running each document alone, causal
and not, over odd lengths (1, no multiple of any block or stride, shorter than a compression block,
empty documents); invalid cu_seqlens are ValueError / TypeError naming the argument."""

import importlib

import pytest
import torch

from helpers import randomize_, rel_err
from nsa_core import SparseAttention, Transformer

# (heads, kv_heads, compress_block, stride, selection_block, selected, memory, window, share, diff, interpolated)
CONFIGS = [
    (4, 4, 4, 4, 4, 2, 1, 2, True, False, False),  # group 1
    (6, 2, 8, 4, 8, 3, 2, 5, True, True, False),  # group 3, overlap, diff top-k, two memory tokens
    (16, 1, 6, 3, 6, 4, 1, 7, False, False, False),  # group 16, per-head selection, block 6 stride 3
    (4, 2, 4, 4, 2, 3, 1, 3, True, False, True),  # selection blocks smaller than the stride, interpolated
    (6, 2, 4, 2, 8, 2, 1, 3, False, True, False),  # per-head selection with diff top-k, overlap
]
LENGTHS = [5, 1, 0, 13, 3, 22, 0]


def cumulative(lengths, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=dtype)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def assert_close_grads(got, want, tol=1e-10):
    for a, b in zip(got, want):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() <= tol
        else:
            assert rel_err(a, b) < tol


def make(config, causal, dim=24):
    heads, kv_heads, block, stride, sel, selected, mem, window, share, diff, interp = config
    module = SparseAttention(
        dim=dim, dim_head=8, heads=heads, kv_heads=kv_heads, sliding_window_size=window, compress_block_size=block,
        compress_block_sliding_stride=stride, selection_block_size=sel, num_selected_blocks=selected,
        num_compressed_mem_kv=mem, causal=causal, query_heads_share_selected_kv=share, use_diff_topk=diff,
        interpolated_importance_score=interp, backend="torch",
    )
    return randomize_(module, seed=len(config) + heads).double()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("config", CONFIGS)
def test_packed_equals_separate(config, causal):
    module = make(config, causal)
    cu = cumulative(LENGTHS)
    x = torch.randn(1, int(cu[-1]), 24, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn_like(x)
    params = list(module.parameters())
    packed = module(x, cu_seqlens=cu)
    alone = torch.cat([module(x[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s], dim=1)
    assert packed.shape == x.shape
    assert rel_err(packed, alone) < 1e-12
    assert_close_grads(grads(packed, [x] + params, grad_out), grads(alone, [x] + params, grad_out))


def test_one_document_is_the_plain_call():
    module = make(CONFIGS[1], causal=True)
    x = torch.randn(1, 19, 24, dtype=torch.float64)
    assert torch.equal(module(x, cu_seqlens=torch.tensor([0, 19])), module(x))


@pytest.mark.parametrize("cu, error, match", [
    ([1, 4, 9], ValueError, "start at 0"),
    ([0, 6, 4, 9], ValueError, "never decrease"),
    ([0, 4, 8], ValueError, "end at the total length 9"),
    ([0.0, 9.0], TypeError, "int32 or int64"),
    ([[0, 9]], ValueError, "1-D"),
])
def test_invalid_cu_seqlens(cu, error, match):
    module = make(CONFIGS[0], causal=True)
    with pytest.raises(error, match=match) as info:
        module(torch.randn(1, 9, 24, dtype=torch.float64), cu_seqlens=torch.tensor(cu))
    assert "cu_seqlens" in str(info.value)


def test_cu_seqlens_needs_batch_one_and_a_tensor():
    module = make(CONFIGS[0], causal=True)
    with pytest.raises(ValueError, match="cu_seqlens.*batch 1"):
        module(torch.randn(2, 9, 24, dtype=torch.float64), cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        module(torch.randn(1, 9, 24, dtype=torch.float64), cu_seqlens=[0, 9])
    with pytest.raises(ValueError, match="cu_seqlens.*cache"):
        module(torch.randn(1, 9, 24, dtype=torch.float64), return_cache=True, cu_seqlens=torch.tensor([0, 9]))


def test_cu_seqlens_on_another_device():
    module = make(CONFIGS[0], causal=True)
    with pytest.raises(ValueError, match="cu_seqlens must be on the input's device"):
        module(torch.randn(1, 9, 24, dtype=torch.float64, device="meta"), cu_seqlens=torch.tensor([0, 9]))


@pytest.mark.parametrize("use_sparse_attn", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_transformer_packed_equals_separate(use_sparse_attn, causal):
    torch.manual_seed(0)
    model = Transformer(num_tokens=50, dim=32, depth=2, dim_head=8, heads=4, kv_heads=2, causal=causal,
                        use_sparse_attn=use_sparse_attn,
                        sparse_attn_kwargs=dict(sliding_window_size=4, compress_block_size=4, selection_block_size=4,
                                                num_selected_blocks=2, backend="torch"))
    model = randomize_(model, std=0.3).double()
    lengths = [7, 1, 0, 12, 5]
    cu = cumulative(lengths, torch.int64)
    ids = torch.randint(0, 50, (1, int(cu[-1])))
    docs = [ids[:, s:e] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]
    logits = model(ids, cu_seqlens=cu)
    assert rel_err(logits, torch.cat([model(d) for d in docs], dim=1)) < 1e-12
    if causal:  # the loss: the mean of every document's own next-token terms
        loss = model(ids, return_loss=True, cu_seqlens=cu)
        terms = [(model(d, return_loss=True) * (d.shape[1] - 1)) for d in docs if d.shape[1] > 1]
        want = sum(terms) / sum(d.shape[1] - 1 for d in docs)
        assert abs(loss.item() - want.item()) < 1e-10


@pytest.mark.parametrize("use_sparse_attn", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_transformer_packed_on_flex_equals_separate(use_sparse_attn, causal, monkeypatch):
    """The dense layers and the compressed branch on FlexAttention (forced on CPU, where it runs eagerly
    and forward only): logits equal each document alone."""
    from nsa_core.kernels import flex_intervals

    calls = []
    real = flex_intervals.flex
    monkeypatch.setattr(flex_intervals, "flex", lambda *a: calls.append(1) or real(*a))
    for op in ("compressed_attention", "document_attention"):
        monkeypatch.setattr(importlib.import_module(f"nsa_core.ops.{op}"), "use_kernels", lambda *a, **k: True)
    torch.manual_seed(0)
    model = Transformer(num_tokens=50, dim=32, depth=2, dim_head=8, heads=6, kv_heads=2, causal=causal,
                        use_sparse_attn=use_sparse_attn,
                        sparse_attn_kwargs=dict(sliding_window_size=4, compress_block_size=8,
                                                compress_block_sliding_stride=4, selection_block_size=4,
                                                num_selected_blocks=2, num_compressed_mem_kv=2, backend="torch"))
    model = randomize_(model, std=0.3).double()
    cu = cumulative([7, 1, 0, 12, 3, 30], torch.int64)
    ids = torch.randint(0, 50, (1, int(cu[-1])))
    with torch.no_grad():
        logits = model(ids, cu_seqlens=cu)
        alone = torch.cat([model(ids[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s], dim=1)
    assert len(calls) == 2
    assert rel_err(logits, alone) < 1e-12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transformer_packed_gpu_train_step():
    """Dense and sparse Transformers, packed, on the GPU in fp32: the loss and every gradient with the dense
    layers and the compressed branch on compiled FlexAttention equal those with both on the per-document twin."""
    lengths = [700, 1, 0, 1500, 77, 300]
    cu = cumulative(lengths, torch.int64).cuda()
    kwargs = dict(sliding_window_size=64, compress_block_size=32, compress_block_sliding_stride=16,
                  selection_block_size=64, num_selected_blocks=4)
    for use_sparse_attn in (False, True):
        torch.manual_seed(0)
        model = Transformer(num_tokens=256, dim=256, depth=2, dim_head=64, heads=8, kv_heads=2,
                            use_sparse_attn=use_sparse_attn, sparse_attn_kwargs=kwargs).cuda()
        ids = torch.randint(0, 256, (1, sum(lengths)), device="cuda")
        results = []
        for on_twin in (False, True):
            with pytest.MonkeyPatch.context() as patch:
                if on_twin:
                    for op in ("compressed_attention", "document_attention"):
                        patch.setattr(importlib.import_module(f"nsa_core.ops.{op}"), "use_kernels", lambda *a, **k: False)
                model.zero_grad(set_to_none=True)
                loss = model(ids, return_loss=True, cu_seqlens=cu)
                loss.backward()
            results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
        (loss_flex, grad_flex), (loss_twin, grad_twin) = results
        assert abs(loss_flex - loss_twin) < 1e-4 * abs(loss_twin)
        assert ((grad_flex - grad_twin).norm() / grad_twin.norm()).item() < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_module_gpu_bf16():
    """The module on the kernels in bf16, packed, against each document alone on the same path."""
    module = SparseAttention(dim=512, dim_head=64, heads=16, kv_heads=4, sliding_window_size=256, compress_block_size=32,
                             compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=8,
                             causal=True, backend="triton")
    module = randomize_(module, std=0.05).cuda().bfloat16()
    lengths = [1000, 1, 0, 3000, 77]
    cu = cumulative(lengths).cuda()
    x = torch.randn(1, sum(lengths), 512, device="cuda", dtype=torch.bfloat16)
    packed = module(x, cu_seqlens=cu).float()
    alone = torch.cat([module(x[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s], dim=1).float()
    assert rel_err(packed, alone) < 3e-2


def test_layers_share_one_descriptor_and_its_layouts(monkeypatch):
    """The layers of one packed forward read cu_seqlens on the host once and build each packed layout
    once; the same tensor changed in place is read again."""
    from nsa_core import seqs as seqs_module
    from nsa_core.model import compression

    reads, builds = [], []
    validated, windows = seqs_module.Seqs._validated_packed, compression._packed_window_tokens
    monkeypatch.setattr(seqs_module.Seqs, "_validated_packed",
                        classmethod(lambda cls, *a: reads.append(1) or validated(*a)))
    monkeypatch.setattr(compression, "_packed_window_tokens", lambda *a: builds.append(1) or windows(*a))
    layers = [make(CONFIGS[1], causal=True) for _ in range(3)]
    cu = cumulative(LENGTHS)
    x = torch.randn(1, sum(LENGTHS), 24, dtype=torch.float64)
    outs = [layer(x, cu_seqlens=cu) for layer in layers]
    assert len(reads) == 1 and len(builds) == 1
    for layer, out in zip(layers, outs):  # what each layer computes is unchanged
        docs = [layer(x[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]
        assert rel_err(out, torch.cat(docs, dim=1)) < 1e-12
    cu[1:] += 0  # an in-place change: the next call validates again
    layers[0](x, cu_seqlens=cu)
    assert len(reads) == 2
