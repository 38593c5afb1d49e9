"""Kernels launched over more than 65,535 (batch x head) programs: CUDA caps a grid's second and
third axes there, so every kernel takes that product on its first axis. Each result must equal the
same kernel run on slices of the batch (rows are independent). CUDA only: the interpreter has no
grid limit, and these batches are too large for it."""

import pytest
import torch

from kernel_cases import random_problem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROWS = 33_000  # x 2 heads: 66,000 programs on the (batch x head) axis


def in_slices(fn, *tensors, size=4_096):
    """fn over batch slices, concatenated along the batch."""
    parts = [fn(*(t[i:i + size] for t in tensors)) for i in range(0, tensors[0].shape[0], size)]
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [torch.cat(p) for p in zip(*parts)]


def selected_forward_backward(q, k, v, indices, valid, gates, grad, block_size):
    """Output and gradients (q, k, v, gates) of selected_attention on the kernels."""
    from nsa_core import selected_attention

    q, k, v, gates = (t.detach().requires_grad_() for t in (q, k, v, gates))
    out = selected_attention(q, k, v, indices, block_size=block_size, valid=valid, gates=gates, causal=True,
                             backend="triton")
    return [out.detach(), *torch.autograd.grad(out, (q, k, v, gates), grad)]


@pytest.mark.parametrize("scheme", ["by_query", "by_block"])
def test_selected_attention_over_a_large_batch(scheme, monkeypatch):
    from nsa_core.kernels.selected_attention import launch

    monkeypatch.setattr(launch, "choose_scheme", lambda *args, **kwargs: scheme)
    p = random_problem(B=ROWS, HKV=2, G=1, T=20, D=16, Dv=16, S=1, block=16, with_gates=True, device="cuda")
    tensors = [p[name] for name in ("q", "k", "v", "indices", "valid", "gates")]
    grad = torch.randn_like(p["q"])  # the output has q's shape here (Dv == D)
    whole = selected_forward_backward(*tensors, grad, p["block_size"])
    sliced = in_slices(lambda *parts: selected_forward_backward(*parts, p["block_size"]), *tensors, grad)
    for name, got, want in zip(("out", "dq", "dk", "dv", "dgates"), whole, sliced):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_rotary_over_a_large_batch():
    from nsa_core.kernels.rotary import rotate

    x = torch.randn(70_000, 1, 3, 8, device="cuda")
    cos, sin = torch.randn(3, 4, device="cuda"), torch.randn(3, 4, device="cuda")
    torch.testing.assert_close(rotate(x, cos, sin), in_slices(lambda part: rotate(part, cos, sin), x), atol=0, rtol=0)


def test_combine_over_a_large_batch():
    from nsa_core.kernels.combine import combine_triton

    c, f, s = (torch.randn(ROWS, 2, 4, 8, device="cuda") for _ in range(3))
    gates = torch.rand(ROWS, 2, 4, 3, device="cuda")
    torch.testing.assert_close(combine_triton(c, f, s, gates), in_slices(combine_triton, c, f, s, gates), atol=0, rtol=0)
