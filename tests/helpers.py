"""Shared test helpers: random weights everywhere, relative errors."""

from __future__ import annotations

import torch
from torch import nn


def randomize_(module: nn.Module, std: float = 0.5, seed: int = 0) -> nn.Module:
    """Fill every parameter with random values (the oracle's zero inits hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def output_and_grads(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output of module(x) and the gradients of sum(output) for x and every parameter that got one."""
    xx = x.clone().requires_grad_()
    out = module(xx)
    out.backward(torch.ones_like(out))
    grads = [xx.grad] + [p.grad.clone() for p in module.parameters() if p.grad is not None]
    module.zero_grad(set_to_none=True)
    return out.detach(), grads
