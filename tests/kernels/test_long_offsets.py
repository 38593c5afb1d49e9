"""Kernels over tensors past 2**31 elements in one batch element: the paper shape (64 query heads,
4 kv heads of 128) at 270,000 tokens, q alone 2.2e9 elements (4.4 GB in bf16). The (batch, head)
offsets are 64-bit (kernels/outputs.py): the last kv head's group of query heads (16 heads, whose
offsets pass 2**31) must equal the same kernel run on that group alone (a tensor well under 2**31,
so its offsets fit 32 bits), and a few rows must equal the PyTorch reference. CUDA only (~12 GB)."""

import pytest
import torch

from nsa_core.seqs import Seqs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

T, H, HK, D, WINDOW, BLOCK, S = 270_000, 64, 4, 128, 512, 64, 4
G = H // HK


def _inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert q[0].numel() > 2**31
    k, v = (torch.randn(1, HK, T, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    return q, k, v


def _close(a, b, what):
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err < 1e-2, (what, err)


def test_sliding_window_past_2_31_elements():
    from nsa_core.ops.sliding_window import sliding_window_attention

    q, k, v = _inputs()
    run = dict(window=WINDOW, causal=True, scale=D ** -0.5)
    q.requires_grad_()
    out = sliding_window_attention(q, k, v, backend="triton", **run)
    do = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, do)
    last = slice(H - G, H)
    q_g = q.detach()[:, last].clone().requires_grad_()
    out_g = sliding_window_attention(q_g, k[:, -1:], v[:, -1:], backend="triton", **run)
    (dq_g,) = torch.autograd.grad(out_g, q_g, do[:, last])
    assert torch.equal(out[:, last], out_g) and torch.equal(dq[:, last], dq_g)
    t0 = T - 300  # the last queries of the last head, on the reference (their keys: the window before them)
    q_r = q.detach()[:, -1:, t0:].float()
    ref = sliding_window_attention(q_r, k[:, -1:, t0 - WINDOW:].float(), v[:, -1:, t0 - WINDOW:].float(),
                                   backend="torch", seqs=Seqs(T - t0, T - t0 + WINDOW, WINDOW), **run)
    _close(out[:, -1:, t0:], ref, "sliding window, last rows")


def test_selected_attention_past_2_31_elements():
    from nsa_core import selected_attention

    q, k, v = _inputs()
    gen = torch.Generator(device="cuda").manual_seed(1)
    pos = torch.arange(T, device="cuda")
    blocks = (torch.rand(1, HK, T, S, device="cuda", generator=gen) * (pos // BLOCK + 1)[:, None]).long()
    valid = torch.ones_like(blocks, dtype=torch.bool)
    run = dict(block_size=BLOCK, causal=True, scale=D ** -0.5)
    q.requires_grad_()
    out = selected_attention(q, k, v, blocks, valid=valid, backend="triton", **run)
    do = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, do)
    last = slice(H - G, H)
    q_g = q.detach()[:, last].clone().requires_grad_()
    out_g = selected_attention(q_g, k[:, -1:], v[:, -1:], blocks[:, -1:], valid=valid[:, -1:], backend="triton", **run)
    (dq_g,) = torch.autograd.grad(out_g, q_g, do[:, last])
    _close(out[:, last], out_g, "selected, last group")
    _close(dq[:, last], dq_g, "selected dq, last group")
    t0 = T - 64
    ref = selected_attention(q.detach()[:, -1:, t0:].float(), k[:, -1:].float(), v[:, -1:].float(),
                             blocks[:, -1:, t0:], valid=valid[:, -1:, t0:], backend="torch",
                             seqs=Seqs(T - t0, T, t0), **run)
    _close(out[:, -1:, t0:], ref, "selected, last rows")


def test_rotary_and_combine_past_2_31_elements():
    from nsa_core.ops.combine import combine
    from nsa_core.ops.rotary import rotary

    q, _, _ = _inputs()
    angles = torch.arange(T, device="cuda", dtype=torch.float32)[:, None] * torch.rand(D // 2, device="cuda")
    rotated = rotary(q, angles.cos(), angles.sin(), backend="triton")
    rows = slice(T - 100, T)
    _close(rotated[:, -1:, rows], rotary(q[:, -1:, rows].float(), angles[rows].cos(), angles[rows].sin(),
                                         backend="torch"), "rotary, last rows")
    del angles
    gates = torch.rand(1, H, T, 3, device="cuda", dtype=torch.bfloat16)
    mixed = combine(q, rotated, q, gates, backend="triton")  # (1, T, H, D)
    ref = combine(q[:, -2:, rows].float(), rotated[:, -2:, rows].float(), q[:, -2:, rows].float(),
                  gates[:, -2:, rows].float(), backend="torch")
    _close(mixed[:, rows, -2:], ref, "combine, last rows")
