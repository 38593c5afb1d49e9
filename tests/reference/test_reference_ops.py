"""The reference ops against brute-force dense attention under an explicit mask (float64)."""

import math

import pytest
import torch

from nsa_core import selected_attention, sliding_window_attention


def dense_masked(q, k, v, allowed, logit_mult=None):
    """q (B, HQ, T, D), k/v (B, HKV, T, D), allowed/logit_mult (B, HQ, T, T)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if logit_mult is not None:
        logits = logits * logit_mult
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return p @ v


def random_selection(B, H, T, S, block, causal, gen):
    """Distinct blocks per query; causal: only blocks strictly before the query's own block."""
    nb = math.ceil(T / block)
    idx = torch.zeros(B, H, T, S, dtype=torch.long)
    valid = torch.zeros(B, H, T, S, dtype=torch.bool)
    for t in range(T):
        limit = t // block if causal else nb
        for b in range(B):
            for h in range(H):
                perm = torch.randperm(max(limit, 1), generator=gen)[:S]
                n = min(S, limit)
                idx[b, h, t, :n] = perm[:n]
                idx[b, h, t, n:] = torch.randint(0, nb, (S - n,), generator=gen)  # junk in invalid slots
                valid[b, h, t, :n] = torch.rand(n, generator=gen) > 0.2
    return idx, valid


@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("with_gates", [False, True])
def test_selected_attention_reference(G, causal, per_head, with_gates):
    gen = torch.Generator().manual_seed(G)
    B, HKV, T, D, Dv, block, S = 2, 2, 37, 16, 8, 8, 3
    HQ = G * HKV
    q = torch.randn(B, HQ, T, D, dtype=torch.float64, generator=gen)
    k = torch.randn(B, HKV, T, D, dtype=torch.float64, generator=gen)
    v = torch.randn(B, HKV, T, Dv, dtype=torch.float64, generator=gen)
    HI = HQ if per_head else HKV
    idx, valid = random_selection(B, HI, T, S, block, causal, gen)
    gates = torch.rand(B, HI, T, S, dtype=torch.float64, generator=gen) + 0.5 if with_gates else None
    out = selected_attention(q, k, v, idx, block_size=block, valid=valid, gates=gates, causal=causal, backend="torch")

    allowed = torch.zeros(B, HI, T, T, dtype=torch.bool)
    mult = torch.ones(B, HI, T, T, dtype=torch.float64)
    pos = torch.arange(T)
    for s in range(S):
        key_in = (pos[None, None, None, :] // block) == idx[..., s : s + 1]
        hit = key_in & valid[..., s : s + 1]
        allowed |= hit
        if gates is not None:
            mult = torch.where(hit, gates[..., s : s + 1].expand_as(mult), mult)
    if causal:
        allowed |= (pos[:, None] // block) == (pos[None, :] // block)
        allowed &= pos[None, :] <= pos[:, None]
    if not per_head:
        allowed, mult = allowed.repeat_interleave(G, 1), mult.repeat_interleave(G, 1)
    expected = dense_masked(q, k, v, allowed, mult)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_selected_attention_no_key_gives_zero():
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    idx = torch.zeros(1, 2, 10, 2, dtype=torch.long)
    valid = torch.zeros(1, 2, 10, 2, dtype=torch.bool)
    out = selected_attention(q, k, v, idx, block_size=4, valid=valid, causal=False, backend="torch")
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 5, 64])
def test_sliding_window_reference(causal, window):
    gen = torch.Generator().manual_seed(window)
    q = torch.randn(2, 6, 41, 16, dtype=torch.float64, generator=gen)
    k = torch.randn(2, 2, 41, 16, dtype=torch.float64, generator=gen)
    v = torch.randn(2, 2, 41, 12, dtype=torch.float64, generator=gen)
    out = sliding_window_attention(q, k, v, window=window, causal=causal, backend="torch")
    pos = torch.arange(41)
    dist = pos[:, None] - pos[None, :]
    allowed = (dist <= window) & ((dist >= 0) if causal else (dist >= -window))
    torch.testing.assert_close(out, dense_masked(q, k, v, allowed.expand(2, 6, 41, 41)), rtol=1e-10, atol=1e-10)


def test_selected_attention_gradcheck():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    idx = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1]).view(1, 1, 9, 1).expand(1, 1, 9, 1).contiguous()
    valid = (torch.arange(9) >= 3).view(1, 1, 9, 1)
    gates = torch.rand(1, 1, 9, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    f = lambda q, k, v, g: selected_attention(q, k, v, idx, block_size=3, valid=valid, gates=g, backend="torch")
    assert torch.autograd.gradcheck(f, (q, k, v, gates))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(block_size=0), ValueError, "block_size"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(indices=torch.zeros(1, 2, 10, 2)), TypeError, "indices must be an integer"),
        (dict(indices=torch.zeros(1, 3, 10, 2, dtype=torch.long)), ValueError, "indices must have shape"),
        (dict(valid=torch.ones(1, 2, 10, 2)), TypeError, "valid must be a bool"),
        (dict(gates=torch.ones(1, 2, 10, 3)), ValueError, "gates must have the shape"),
    ],
)
def test_selected_attention_bad_arguments(kwargs, exc, match):
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    args = dict(indices=torch.zeros(1, 2, 10, 2, dtype=torch.long), block_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        selected_attention(q, k, v, args.pop("indices"), **args)


def test_qkv_errors():
    with pytest.raises(ValueError, match="multiple of kv heads"):
        sliding_window_attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), window=2)
    with pytest.raises(TypeError, match="floating"):
        sliding_window_attention(*(torch.ones(1, 2, 4, 8, dtype=torch.long),) * 3, window=2)


def test_selected_attention_window_equals_sliding_window():
    """The window argument: preceding blocks selected + keys before t - window masked = sliding window."""
    gen = torch.Generator().manual_seed(3)
    T, block, window = 53, 8, 11
    q = torch.randn(1, 4, T, 8, dtype=torch.float64, generator=gen)
    k = torch.randn(1, 2, T, 8, dtype=torch.float64, generator=gen)
    v = torch.randn(1, 2, T, 8, dtype=torch.float64, generator=gen)
    before = math.ceil(window / block)
    own = torch.arange(T) // block
    idx = own[:, None] - torch.arange(before, 0, -1)[None, :]
    valid = (idx >= 0).view(1, 1, T, before).expand(1, 2, T, before)
    idx = idx.clamp(min=0).view(1, 1, T, before).expand(1, 2, T, before)
    out = selected_attention(q, k, v, idx, block_size=block, valid=valid, window=window, backend="torch")
    expected = sliding_window_attention(q, k, v, window=window, backend="torch")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
