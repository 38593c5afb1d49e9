"""Sliding-window attention kernels (forward, dQ, dK/dV) against the PyTorch reference:
interpreter on CPU in CI (fp32, odd lengths, GQA groups 1 and 3, windows shorter and longer than
a tile, D != Dv, NaN-poisoned outputs), GPU tests at real sizes in bf16."""

import pytest
import torch

from nsa_core import sliding_window_attention
from nsa_core.ops.dispatch import kernel_unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                                reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")


def problem(B, HQ, HKV, T, D, Dv, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, d, generator=gen).to(device) for h, d in ((HQ, D), (HKV, D), (HKV, Dv))]


def close(a, b, tol=2e-5) -> bool:
    """max |a - b| within tol of max(1, max |b|) (a gradient can be exactly zero, e.g. dq at T = 1)."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def outputs_and_grads(q, k, v, window, backend, dtype=None, seed=1, seqs=None):
    ins = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = sliding_window_attention(*ins, window=window, causal=True, backend=backend, seqs=seqs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    out.backward(g)
    return [out.detach()] + [t.grad for t in ins]


@pytest.mark.parametrize("T, window", [(1, 3), (150, 5), (203, 64), (133, 200), (77, 1)])
@pytest.mark.parametrize("G", [1, 3])
def test_window_kernel_matches_reference(T, window, G, poisoned_outputs):
    q, k, v = problem(2, 2 * G, 2, T, 32, 16, seed=T + window)
    got = outputs_and_grads(q, k, v, window, "triton")
    want = outputs_and_grads(q, k, v, window, "torch")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        assert close(a, b), name


@pytest.mark.parametrize("TQ, TK, offset, window", [(40, 160, 120, 5), (37, 203, 83, 64), (64, 130, 0, 200),
                                                    (1, 77, 76, 9), (50, 150, 50, 1)])
@pytest.mark.parametrize("G", [1, 3])
def test_window_kernel_with_query_offset(TQ, TK, offset, window, G, poisoned_outputs):
    """TQ queries at key positions offset ... over TK keys (a sequence-parallel shard, queries after
    cached keys, or queries before later keys): keys no query sees get zero gradients."""
    from nsa_core.seqs import Seqs

    gen = torch.Generator().manual_seed(TQ + TK + offset)
    q = torch.randn(2, 2 * G, TQ, 32, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, 2, TK, d, generator=gen).to(DEVICE) for d in (32, 16))
    seqs = Seqs(TQ, TK, offset)
    got = outputs_and_grads(q, k, v, window, "triton", seqs=seqs)
    want = outputs_and_grads(q, k, v, window, "torch", seqs=seqs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        assert close(a, b), name


def test_window_kernel_odd_head_dims(poisoned_outputs):
    q, k, v = problem(1, 3, 1, 70, 24, 40, seed=3)
    for a, b in zip(outputs_and_grads(q, k, v, 9, "triton"), outputs_and_grads(q, k, v, 9, "torch")):
        assert close(a, b)


def test_window_opcheck_and_compile():
    from nsa_core.kernels.sliding_window.autograd import _fwd

    q, k, v = problem(1, 4, 2, 40, 16, 16, seed=4)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 7, 0.25, 0)
    torch.library.opcheck(_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    def f(q, k, v):
        return sliding_window_attention(q, k, v, window=7, backend="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_window_triton_refuses_what_it_cannot_run():
    q, k, v = problem(1, 2, 1, 8, 16, 16, seed=5)
    # the non-causal window is the reference's by design (the module's oracle semantics): no error
    both_ways = sliding_window_attention(q, k, v, window=2, causal=False, backend="triton")
    assert torch.equal(both_ways, sliding_window_attention(q, k, v, window=2, causal=False, backend="torch"))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        sliding_window_attention(q.double(), k.double(), v.double(), window=2, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("G, window, shard", [(16, 512, None), (1, 300, None), (4, 100, None), (16, 512, 3)])
def test_window_kernel_gpu_bf16(G, window, shard):
    """bf16 kernel error against an fp32 reference within 3x PyTorch's own bf16 error; `shard`: the
    queries of the last quarter of the keys (a sequence-parallel shard of rank 3 of 4)."""
    q, k, v = problem(1, 4 * G, 4, 4096 + 77, 128, 128, seed=G, device="cuda")
    seqs = None
    if shard is not None:
        from nsa_core.seqs import Seqs

        n = q.shape[2] // 4
        q, k, v, seqs = q[:, :, shard * n:(shard + 1) * n], k[:, :, :4 * n], v[:, :, :4 * n], Seqs(n, 4 * n, shard * n)
    exact = outputs_and_grads(q, k, v, window, "torch", seqs=seqs)
    ours = outputs_and_grads(q, k, v, window, "triton", dtype=torch.bfloat16, seqs=seqs)
    torch_bf16 = outputs_and_grads(q, k, v, window, "torch", dtype=torch.bfloat16, seqs=seqs)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), ours, torch_bf16, exact):
        ours_err = ((a.float() - e).norm() / e.norm()).item()
        torch_err = ((b.float() - e).norm() / e.norm()).item()
        assert ours_err <= 3 * torch_err + 1e-6, (name, ours_err, torch_err)
    again = outputs_and_grads(q, k, v, window, "triton", dtype=torch.bfloat16, seqs=seqs)
    assert all(torch.equal(a, b) for a, b in zip(ours, again))  # no atomics: bit-identical reruns


def test_kernels_take_rows_past_2_31_per_batch_element_and_refuse_rows_past_it():
    """Shapes only (meta tensors): the paper shape at 1M tokens (q of one batch element 8.6e9
    elements) is taken (64-bit (batch, head) offsets); a single (batch, head) row of T x D >= 2**31
    elements is refused with the reason (32-bit offsets within a row)."""
    from nsa_core.kernels.selected_attention.launch import kernel_unsupported_reason as selection_reason
    from nsa_core.kernels.sliding_window.launch import kernel_unsupported_reason as window_reason

    big_q = torch.empty(2, 64, 2**20, 128, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(2, 4, 2**20, 128, device="meta", dtype=torch.bfloat16)
    assert window_reason(big_q, kv, kv) is None and selection_reason(big_q, kv, kv, 64) is None
    long_q = torch.empty(1, 1, 2**24, 128, device="meta", dtype=torch.bfloat16)
    long_kv = torch.empty(1, 1, 2**24, 128, device="meta", dtype=torch.bfloat16)
    assert "32-bit offsets within a row" in window_reason(long_q, long_kv, long_kv)
    assert "32-bit offsets within a row" in selection_reason(long_q, long_kv, long_kv, 64)

