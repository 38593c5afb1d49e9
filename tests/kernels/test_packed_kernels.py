"""Packed documents (cu_seqlens) on the kernels, one launch for all documents, against the PyTorch
twin (each document alone): interpreter on CPU in CI (fp32, tiny shapes, odd and empty documents,
NaN-poisoned outputs), bf16 on the GPU."""

import pytest
import torch

import kernel_cases
from kernel_cases import packed_seqs
from nsa_core.ops import Seqs, selected_attention, sliding_window_attention
from nsa_core.ops.dispatch import kernel_unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                                reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")

LENGTHS = [9, 1, 0, 70, 3, 40, 0]
SHORT_LENGTHS = [9, 1, 0, 27, 3, 17, 0]  # the selected-attention kernels run a program per token: fewer tokens


def packed(lengths, device=DEVICE) -> Seqs:
    return packed_seqs(lengths, device)


def packed_selection(seqs, HI, S, block, causal, seed, with_gates=False):
    return kernel_cases.packed_selection(seqs, HI, S, block, causal, seed, with_gates, device=DEVICE)


def qkv(HQ, HKV, T, D, Dv, seed, device=DEVICE, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, T, d, generator=gen).to(device, dtype) for h, d in ((HQ, D), (HKV, D), (HKV, Dv))]


def run(op, inputs, seed=1, **kwargs):
    """Output and the gradients of the floating inputs for a random upstream gradient."""
    leaves = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = op(*leaves, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    out.backward(g)
    return [out.detach()] + [t.grad for t in leaves if t is not None and t.is_floating_point()]


def close(a, b, tol=2e-5) -> bool:
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("G, window", [(1, 5), (3, 64), (2, 100)])
def test_window_kernel_packed(G, window, poisoned_outputs):
    seqs = packed(LENGTHS)
    inputs = qkv(2 * G, 2, seqs.q_len, 16, 24, seed=window)
    got = run(sliding_window_attention, inputs, window=window, seqs=seqs, backend="triton")
    want = run(sliding_window_attention, inputs, window=window, seqs=seqs, backend="torch")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        assert close(a, b), name


@pytest.mark.parametrize("fwd_scheme", ["by_query", "by_block", "by_tile"])
@pytest.mark.parametrize("G, per_head, block, causal, gates", [
    (1, False, 16, True, False), (3, False, 8, True, True), (2, True, 16, False, False), (16, False, 4, True, False),
])
def test_selected_kernel_packed(G, per_head, block, causal, gates, fwd_scheme, monkeypatch, poisoned_outputs):
    from nsa_core.kernels.selected_attention import launch

    monkeypatch.setattr(launch, "FWD_SCHEME", fwd_scheme)
    seqs = packed(SHORT_LENGTHS)
    HKV = 1 if G == 16 else 2
    q, k, v = qkv(G * HKV, HKV, seqs.q_len, 16, 16, seed=block + G)
    indices, valid, gate_values = packed_selection(seqs, G * HKV if per_head else HKV, 3, block, causal, seed=G,
                                                   with_gates=gates)

    def op(q, k, v, gate_values, backend):
        return selected_attention(q, k, v, indices, block_size=block, valid=valid, gates=gate_values, causal=causal,
                                  seqs=seqs, backend=backend)

    got = run(op, [q, k, v, gate_values], backend="triton")
    want = run(op, [q, k, v, gate_values], backend="torch")
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgates"), got, want):
        assert torch.isfinite(a).all(), name
        assert close(a, b), name


def test_selected_kernel_packed_split_blocks(monkeypatch, poisoned_outputs):
    """Blocks run as sub-blocks (a key tile too large for shared memory: split_blocks.py) on packed
    documents: each token's own sub-blocks come from its document-relative position."""
    from nsa_core.kernels.selected_attention import tiles

    monkeypatch.setattr(tiles, "kernel_block", lambda D, DV, block, dtype: block // 3)
    seqs = packed(SHORT_LENGTHS)
    q, k, v = qkv(4, 2, seqs.q_len, 16, 16, seed=5)
    indices, valid, gate_values = packed_selection(seqs, 2, 2, 12, True, seed=5, with_gates=True)

    def op(q, k, v, gate_values, backend):
        return selected_attention(q, k, v, indices, block_size=12, valid=valid, gates=gate_values, seqs=seqs,
                                  backend=backend)

    got = run(op, [q, k, v, gate_values], backend="triton")
    want = run(op, [q, k, v, gate_values], backend="torch")
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgates"), got, want):
        assert torch.isfinite(a).all(), name
        assert close(a, b), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("branch", ["window", "selected"])
def test_packed_kernels_gpu_bf16(branch):
    """bf16 kernels on packed documents against an fp32 twin: within 3x PyTorch's own bf16 error."""
    lengths = [1000, 1, 0, 3000, 77, 2048]
    seqs = packed(lengths, device="cuda")
    q, k, v = qkv(64, 4, seqs.q_len, 128, 128, seed=0, device="cuda")
    if branch == "window":
        op = lambda q, k, v, backend: sliding_window_attention(q, k, v, window=512, seqs=seqs, backend=backend)
    else:
        indices, valid, _ = packed_selection(seqs, 4, 16, 64, True, seed=0)

        def op(q, k, v, backend):
            return selected_attention(q, k, v, indices, block_size=64, valid=valid, seqs=seqs, backend=backend)
    exact = run(op, [q, k, v], backend="torch")
    ours = run(op, [t.bfloat16() for t in (q, k, v)], backend="triton")
    torch_bf16 = run(op, [t.bfloat16() for t in (q, k, v)], backend="torch")
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), ours, torch_bf16, exact):
        ours_err = ((a.float() - e).norm() / e.norm()).item()
        torch_err = ((b.float() - e).norm() / e.norm()).item()
        assert ours_err <= 3 * torch_err + 1e-6, (name, ours_err, torch_err)


def test_module_packed_selection_on_kernels(monkeypatch):
    """SparseAttention on the kernels (fp32): packed documents equal each document alone on the
    PyTorch path (output and every gradient), the block scoring of all documents in one launch
    (block_topk_packed), never one document at a time."""
    from helpers import reference_and_kernel_modules, rel_err
    from nsa_core.kernels import block_topk
    import importlib

    from nsa_core.ops import block_selection

    kwargs = dict(dim=16, dim_head=8, heads=4, kv_heads=2, sliding_window_size=4, compress_block_size=8,
                  compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=2, causal=True,
                  query_heads_share_selected_kv=True)
    reference, module = reference_and_kernel_modules(0.3, DEVICE, **kwargs)
    seqs = packed([9, 1, 0, 22, 3, 0, 12])  # the interpreter runs the selected attention by token: few tokens
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, seqs.q_len, 16, generator=gen).to(DEVICE).requires_grad_()
    g = torch.randn(x.shape, generator=gen).to(DEVICE)
    alone = torch.cat([reference(x[:, s:e]) for s, e in seqs.spans() if e > s], dim=1)
    want = [alone] + list(torch.autograd.grad(alone, [x] + list(reference.parameters()), g, allow_unused=True))
    calls = []
    kernel = block_topk.block_topk_packed
    monkeypatch.setattr(block_topk, "block_topk_packed", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(block_selection, "_select_per_document", None)  # the per-document twin must not run
    # the compressed branch's packed kernel (FlexAttention) has no CPU backward: its twin runs here
    monkeypatch.setattr(importlib.import_module("nsa_core.ops.compressed_attention"), "use_kernels",
                        lambda *a, **k: False)
    out = module(x, cu_seqlens=seqs.cu_seqlens)
    got = [out] + list(torch.autograd.grad(out, [x] + list(module.parameters()), g, allow_unused=True))
    assert calls
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if b is not None and b.abs().max() > 0:
            assert rel_err(a, b) < 1e-4
