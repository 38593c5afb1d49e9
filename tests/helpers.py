"""Shared test helpers: random weights everywhere, relative errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nsa_core.ops.dispatch import kernel_unavailable_reason

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel tests' device: the GPU, else the interpreter
needs_kernels = pytest.mark.skipif(kernel_unavailable_reason(torch.device(KERNEL_DEVICE)) is not None,
                                   reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")


def randomize_(module: nn.Module, std: float = 0.5, seed: int = 0) -> nn.Module:
    """Fill every parameter with random values (the oracle's zero inits hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)
    return module


def reference_and_kernel_modules(std: float, device, **kwargs):
    """SparseAttention(**kwargs) twice with the same random weights: on the PyTorch path and on the kernels."""
    from nsa_core import SparseAttention

    reference = randomize_(SparseAttention(backend="torch", **kwargs), std=std).to(device)
    kernels = SparseAttention(backend="triton", **kwargs).to(device)
    kernels.load_state_dict(reference.state_dict())
    return reference, kernels


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def forward_backward(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor | None = None):
    """module(x) on a fresh leaf copy of x, then backward of grad_out (ones if None):
    (output, input gradient, {parameter name: gradient or None}). The module's gradients are
    cleared afterwards, so it can run again."""
    xx = x.clone().requires_grad_()
    out = module(xx)
    out.backward(torch.ones_like(out) if grad_out is None else grad_out)
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return out.detach(), xx.grad, grads


def output_and_grads(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output of module(x) and the gradients of sum(output) for x and every parameter that got one."""
    out, x_grad, grads = forward_backward(module, x)
    return out, [x_grad] + [g for g in grads.values() if g is not None]


def rotate(emb, t: torch.Tensor, offset: int = 0, backend: str = "torch") -> torch.Tensor:
    """Rotate t (..., n, d) with the RotaryEmbedding emb as if its tokens sat at offset ... offset + n - 1."""
    from nsa_core.ops.rotary import rotary

    positions = torch.arange(offset, offset + t.shape[-2], device=t.device)
    return rotary(t, *emb.tables(positions, t.dtype), backend=backend)


def check_kernels_equal_reference(device, **kwargs) -> None:
    """SparseAttention(**kwargs) on the kernels against the PyTorch path with the same random weights
    (std 0.3), float32: the output of 2 rows of 45 tokens (relative 1e-4) and the input gradient of its
    squared sum (1e-3), then the output of two packed documents of 61 and 89 tokens (>= 128 queries, where
    FlexAttention on CUDA takes query groups that are not powers of two)."""
    reference, kernels = reference_and_kernel_modules(0.3, device, **kwargs)
    x = torch.randn(2, 45, kwargs["dim"], device=device)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_k = reference(a), kernels(b)
    assert rel_err(out_k, out_r) < 1e-4
    out_r.square().sum().backward()
    out_k.square().sum().backward()
    assert rel_err(b.grad, a.grad) < 1e-3
    rows = torch.randn(1, 150, kwargs["dim"], device=device)
    cu = torch.tensor([0, 61, 150], device=device)
    with torch.no_grad():
        assert rel_err(kernels(rows, cu_seqlens=cu), reference(rows, cu_seqlens=cu)) < 1e-4
