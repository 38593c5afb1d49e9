"""The sliding window as causal attention over chunks of the window (kernels/window_sdpa.py): with the pieces'
PyTorch twin the output and gradients equal the reference in float64 (odd lengths, lengths below one chunk,
GQA groups 1 / 3 / 16, D != Dv, batches > 1); the op takes the path only where its rule says; on the GPU the
cuDNN pieces are within 3x the bf16 band kernels' own error of float64."""

import pytest
import torch

from nsa_core import sliding_window_attention
from nsa_core.kernels import split_staircase, window_sdpa
from nsa_core.reference.sliding_window import sliding_window_reference


def problem(B, HQ, HKV, T, D, Dv, seed, dtype=torch.float64, device="cpu", token_major=False):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h, d: torch.randn(B, T, h, d, generator=gen, dtype=dtype).transpose(1, 2) if token_major \
        else torch.randn(B, h, T, d, generator=gen, dtype=dtype)  # noqa: E731
    return [make(h, d).to(device).requires_grad_() for h, d in ((HQ, D), (HKV, D), (HKV, Dv))]


def with_grads(fn, inputs, grad):
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, inputs, grad)]


@pytest.mark.parametrize("B, HQ, HKV, T, window, D, Dv", [
    (2, 6, 2, 37, 8, 16, 12),   # G 3, T not a multiple of the window, D != Dv
    (1, 3, 3, 64, 16, 8, 8),    # G 1, T = 4 windows exactly
    (1, 4, 1, 5, 8, 8, 8),      # one chunk, shorter than the window
    (3, 16, 1, 50, 7, 16, 16),  # G 16, odd window
    (1, 2, 2, 9, 1, 4, 4),      # window 1: the token and the one before
])
@pytest.mark.parametrize("token_major", [False, True])
def test_chunked_window_equals_reference(B, HQ, HKV, T, window, D, Dv, token_major):
    q, k, v = problem(B, HQ, HKV, T, D, Dv, seed=T * window + HQ, token_major=token_major)
    grad = torch.randn(B, HQ, T, Dv, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = with_grads(lambda *t: window_sdpa.chunked_window_attention(*t, window, 0.3, split_staircase.math_partial),
                     (q, k, v), grad)
    want = with_grads(lambda *t: sliding_window_reference(*t, window, scale=0.3), (q, k, v), grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert (a - b).abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item()), name


def test_rule_keeps_cpu_and_short_rows_on_the_band_kernels(monkeypatch):
    q, k, v = problem(1, 4, 2, 64, 8, 8, seed=0, dtype=torch.float32)
    monkeypatch.setattr(window_sdpa, "FROM_CHUNKS", 2)
    assert not window_sdpa.chunked_window_pays(q, k, v, 16)  # CPU float32: cuDNN does not take it
    monkeypatch.setattr(window_sdpa, "cudnn_split_runs", lambda *t: True)
    assert window_sdpa.chunked_window_pays(q, k, v, 16)  # 4 chunks of 16
    assert not window_sdpa.chunked_window_pays(q, k, v, 33)  # under 2 chunks
    torch.use_deterministic_algorithms(True)
    try:
        assert not window_sdpa.chunked_window_pays(q, k, v, 16)  # bit-reproducible runs keep the band kernels
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(window_sdpa, "FROM_CHUNKS", None)
    assert not window_sdpa.chunked_window_pays(q, k, v, 16)


def test_op_takes_the_chunks_only_for_plain_rows(monkeypatch):
    """Through sliding_window_attention: a plain row goes to the chunks where the rule says so (here with the
    PyTorch pieces standing in for cuDNN), a row after cached keys stays on the band kernels."""
    calls = []
    real = window_sdpa.chunked_window_attention

    def spy(q, k, v, window, scale):
        calls.append(q.shape)
        return real(q, k, v, window, scale, split_staircase.math_partial)

    monkeypatch.setattr(window_sdpa, "chunked_window_pays", lambda *a: True)
    monkeypatch.setattr(window_sdpa, "chunked_window_attention", spy)
    monkeypatch.setattr("nsa_core.ops.sliding_window.use_kernels", lambda *a, **kw: True)
    monkeypatch.setattr("nsa_core.kernels.sliding_window.autograd.sliding_window_triton",
                        lambda q, k, v, window, scale, q_offset, first: sliding_window_reference(
                            q, k, v, window, scale=scale, q_offset=q_offset))
    q, k, v = problem(2, 6, 2, 41, 16, 8, seed=3)
    out = sliding_window_attention(q, k, v, window=5)
    assert calls == [q.shape]
    torch.testing.assert_close(out, sliding_window_reference(q, k, v, 5), rtol=0, atol=1e-12)
    from nsa_core.seqs import Seqs

    sliding_window_attention(q[:, :, 30:], k, v, window=5, seqs=Seqs(11, 41, 30))
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("G, T, token_major", [(16, 4093, False), (4, 4096, True), (3, 1500, False)])
def test_cudnn_chunks_gpu(G, T, token_major):
    """Paper window 512, d 128, bf16 on cuDNN: output and gradients within 3x the bf16 band kernels' own error of
    float64 (plus a float64 round-off term), and the rule takes the chunks for such a row."""
    window, HKV = 512, 4 if G != 3 else 2
    exact_in = problem(1, G * HKV, HKV, T, 128, 128, seed=G, device="cuda", token_major=token_major)
    grad = torch.randn(1, G * HKV, T, 128, generator=torch.Generator().manual_seed(5), dtype=torch.float64).cuda()
    low = lambda: [t.detach().bfloat16().requires_grad_() for t in exact_in]  # noqa: E731
    exact = with_grads(lambda *t: sliding_window_reference(*t, window, scale=128 ** -0.5), exact_in, grad)
    band = with_grads(lambda *t: sliding_window_attention(*t, window=window, backend="triton"), low(), grad.bfloat16())
    chunks_in = low()
    assert window_sdpa.cudnn_split_runs(*(t[:, :, :window] for t in chunks_in))
    got = with_grads(lambda *t: window_sdpa.chunked_window_attention(*t, window, 128 ** -0.5), chunks_in,
                     grad.bfloat16())
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, band, exact):
        assert torch.isfinite(a).all(), name
        assert (a.double() - e).norm() <= 3 * (b.double() - e).norm() + 1e-6 * e.norm(), name
