"""The fast PyTorch path (reference/fast_*.py) against the loop reference it is the twin of:
outputs and gradients in float64 (exact up to rounding) and float32 (within a few times the loop
reference's own error against float64), odd lengths, GQA groups 3 and 1, per-head selections,
causal and not, query offsets, windows, row gates, packed documents, several query groups, the
selected branch's two forms (unions of blocks, block-masked staircase), NaN."""

import importlib

import pytest
import torch

from nsa_core.seqs import Seqs
from nsa_core.reference import fast_selected, fast_window
from nsa_core.reference.compressed_attention import compressed_attention_chunked
from nsa_core.reference.fast_compressed import compressed_attention_fast
from nsa_core.reference.fast_selected import row_factors, selected_attention_fast
from nsa_core.reference.fast_window import sliding_window_fast
from nsa_core.reference.selected_attention import selected_attention_reference
from nsa_core.reference.sliding_window import sliding_window_reference

selected_op = importlib.import_module("nsa_core.ops.selected_attention")


def qkv(B, HKV, G, T, N, D, Dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return make(B, HKV * G, T, D), make(B, HKV, N, D), make(B, HKV, N, Dv)


def out_and_grads(fn, tensors, seed=1):
    out = fn(*tensors)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return [out] + list(torch.autograd.grad(out, tensors, grad))


def assert_twins(fast, loop, tensors):
    """float64: equal up to rounding; float32: fast's error against the float64 loop reference at
    most 4x the float32 loop reference's own (plus a few ulps)."""
    got = out_and_grads(fast, tensors)
    want = out_and_grads(loop, tensors)
    if tensors[0].dtype == torch.float64:
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        return
    exact = out_and_grads(loop, [t.detach().double().requires_grad_() for t in tensors])
    for a, b, e in zip(got, want, exact):
        own = (b.double() - e).abs().max().item()
        assert (a.double() - e).abs().max().item() <= 4 * own + 1e-6


def selection(B, HI, T, S, BS, N, causal, q_offset, seed=2):
    gen = torch.Generator().manual_seed(seed)
    nb = -(-N // BS)
    if causal:  # blocks at or before the own block, the own block never valid
        own = ((q_offset + torch.arange(T)) // BS)[:, None]
        idx = (torch.rand(B, HI, T, S, generator=gen) * (own + 1)).long()
        valid = (torch.rand(B, HI, T, S, generator=gen) < 0.8) & (idx != own)
    else:  # distinct blocks, some slots invalid, some queries with none
        idx = torch.rand(B, HI, T, nb, generator=gen).argsort(dim=-1)[..., :S]
        valid = torch.rand(B, HI, T, S, generator=gen) < 0.7
    return idx, valid


SELECTED = [  # B, HKV, G, per-head selection, T, q_offset, block, slots, causal, window, D, Dv
    (2, 2, 3, False, 37, 0, 4, 2, True, None, 8, 6),
    (1, 1, 1, False, 101, 0, 8, 3, False, None, 8, 8),
    (2, 1, 3, True, 45, 13, 4, 2, True, None, 4, 4),
    (1, 3, 1, False, 3, 0, 4, 1, True, None, 4, 4),
    (1, 1, 3, False, 83, 7, 16, 4, True, None, 8, 8),
    (1, 1, 3, False, 61, 0, 4, 2, True, 9, 8, 8),
    (2, 1, 1, False, 121, 5, 2, 3, True, None, 4, 4),
]


@pytest.mark.parametrize("unions", [False, True])  # True: chunks of 2 queries, so causal rows take the unions too
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", SELECTED)
def test_selected_fast_equals_loop(case, dtype, unions, monkeypatch):
    """Causal rows whose chunk unions would hold every block take the block-masked staircase; with
    chunks of 2 queries (most cases) the unions of blocks."""
    B, HKV, G, per_head, T, off, BS, S, causal, window, D, Dv = case
    if unions:
        monkeypatch.setattr(fast_selected, "selected_chunk", lambda *a: 2)
    N = T + off
    q, k, v = qkv(B, HKV, G, T, N, D, Dv, dtype)
    idx, valid = selection(B, HKV * G if per_head else HKV, T, S, BS, N, causal, off)
    assert_twins(lambda q, k, v: selected_attention_fast(q, k, v, idx, BS, valid, None, causal, None, window, off),
                 lambda q, k, v: selected_attention_reference(q, k, v, idx, BS, valid, None, causal, None, window, off),
                 [q, k, v])


def test_selected_row_gates_and_empty_rows():
    """The non-causal fine branch's gates: ones, and zeros (with every slot valid) for a query
    with no valid slot, which averages its blocks' values; folded into the queries."""
    B, HKV, G, T, BS, S = 2, 1, 3, 53, 4, 3
    q, k, v = qkv(B, HKV, G, T, T, 8, 8, torch.float64)
    idx, valid = selection(B, HKV, T, S, BS, T, False, 0)
    none = ~valid.any(dim=-1, keepdim=True)
    gates = torch.where(none, 0.0, 1.0).expand(B, HKV, T, S).to(torch.float64)
    valid = valid | none
    factors = row_factors(idx, valid, gates, causal=False)
    assert factors is not None and (factors == 0).any()
    assert_twins(lambda q, k, v: selected_attention_fast(q, k, v, idx, BS, valid, factors, False),
                 lambda q, k, v: selected_attention_reference(q, k, v, idx, BS, valid, gates, False), [q, k, v])
    # a query whose slots are all invalid (no gates) gives zeros
    out = selected_attention_fast(q, k, v, idx, BS, torch.zeros_like(valid), None, False)
    assert torch.equal(out, torch.zeros_like(out))


def test_selected_gates_per_block_take_the_loop(monkeypatch):
    """Gates that differ between a query's blocks, or need a gradient, run on the loop reference."""
    B, HKV, G, T, BS, S = 1, 1, 2, 29, 4, 2
    q, k, v = qkv(B, HKV, G, T, T, 8, 8, torch.float64)
    idx, valid = selection(B, HKV, T, S, BS, T, True, 0)
    gates = torch.rand(B, HKV, T, S, dtype=torch.float64, requires_grad=True)
    assert row_factors(idx, valid, gates.detach(), causal=True) is None
    monkeypatch.setattr(selected_op, "selected_attention_fast", lambda *a, **k: pytest.fail("fast path taken"))
    out = selected_op.selected_attention(q, k, v, idx, block_size=BS, valid=valid, gates=gates, backend="torch")
    assert torch.equal(out, selected_attention_reference(q, k, v, idx, BS, valid, gates))


def test_selected_several_groups(monkeypatch):
    """Queries taken a few chunks at a time (a small memory budget) change nothing."""
    B, HKV, G, T, BS, S = 1, 2, 3, 131, 4, 2
    q, k, v = qkv(B, HKV, G, T, T, 8, 8, torch.float64)
    idx, valid = selection(B, HKV, T, S, BS, T, True, 0)
    whole = selected_attention_fast(q, k, v, idx, BS, valid)
    small = fast_selected.chunk_group
    assert 8 * (S + 1) < -(-T // BS)  # chunks of 8: unions, not the staircase
    monkeypatch.setattr(fast_selected, "chunk_group", lambda n, c, e, budget=0: small(n, c, e, budget=1))
    monkeypatch.setattr(fast_selected, "selected_chunk", lambda *a: 8)
    torch.testing.assert_close(selected_attention_fast(q, k, v, idx, BS, valid), whole, rtol=1e-12, atol=1e-12)


def test_selected_packed_documents_equal_each_alone():
    """The op's PyTorch side on packed documents (the fast path per document) equals the loop
    reference on each document alone."""
    cu = torch.tensor([0, 17, 18, 18, 47])
    T, BS, S = 47, 4, 2
    q, k, v = qkv(1, 1, 3, T, T, 8, 8, torch.float64)
    idx, valid = selection(1, 1, T, S, BS, T, False, 0)
    got = selected_op.selected_attention(q, k, v, idx, block_size=BS, valid=valid, causal=False, backend="torch",
                                         seqs=Seqs.packed(cu, T))
    for s, e in [(0, 17), (17, 18), (18, 47)]:
        want = selected_attention_reference(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], idx[:, :, s:e], BS,
                                            valid[:, :, s:e], None, False)
        torch.testing.assert_close(got[:, :, s:e], want, rtol=1e-10, atol=1e-12)


WINDOW = [  # B, HKV, G, T, q_offset, window, causal, D, Dv
    (2, 2, 3, 37, 0, 5, True, 8, 6), (1, 1, 1, 101, 0, 16, False, 8, 8), (2, 1, 3, 45, 13, 3, True, 4, 4),
    (1, 2, 1, 9, 0, 40, False, 4, 4), (1, 1, 3, 121, 7, 33, False, 8, 8), (2, 1, 3, 71, 0, 2, True, 8, 8),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", WINDOW)
def test_window_fast_equals_loop(case, dtype):
    B, HKV, G, T, off, w, causal, D, Dv = case
    tensors = qkv(B, HKV, G, T, T + off, D, Dv, dtype)
    assert_twins(lambda q, k, v: sliding_window_fast(q, k, v, w, causal, None, off),
                 lambda q, k, v: sliding_window_reference(q, k, v, w, causal, None, off), tensors)


def test_window_several_groups(monkeypatch):
    q, k, v = qkv(1, 1, 3, 149, 149, 8, 8, torch.float64)
    whole = sliding_window_fast(q, k, v, 5)
    small = fast_window.chunk_group
    monkeypatch.setattr(fast_window, "chunk_group", lambda n, c, e, budget=0: small(n, c, e, budget=1))
    torch.testing.assert_close(sliding_window_fast(q, k, v, 5), whole, rtol=1e-12, atol=1e-12)


COMPRESSED = [  # B, HKV, G, T, q_offset, memory, stride, causal, D, Dv
    (2, 2, 3, 37, 0, 1, 4, True, 8, 6), (1, 1, 1, 101, 0, 2, 8, False, 8, 8), (2, 1, 3, 45, 13, 1, 2, True, 4, 4),
    (1, 2, 1, 3, 0, 1, 4, True, 4, 4), (1, 1, 3, 121, 7, 3, 16, True, 8, 8),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", COMPRESSED)
def test_compressed_fast_equals_loop(case, dtype):
    B, HKV, G, T, off, M, stride, causal, D, Dv = case
    tensors = qkv(B, HKV, G, T, M + (T + off) // stride, D, Dv, dtype)
    assert_twins(lambda q, k, v: compressed_attention_fast(q, k, v, M, stride, causal, None, off),
                 lambda q, k, v: compressed_attention_chunked(q, k, v, M, stride, causal, None, off), tensors)


@pytest.mark.parametrize("unions", [False, True])  # the selected branch's staircase, or its unions of blocks
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_keys_reach_only_the_queries_that_see_them(poison, unions, monkeypatch):
    """A bad key or value makes NaN every row that sees it and leaves the others bit-identical to a
    clean run: with NaN exactly the loop reference's rows; with inf a superset (the loop reference
    lets a key whose logit is -inf weigh 0, the fast path poisons every row that sees it)."""
    T, BS = 41, 4
    if unions:
        monkeypatch.setattr(fast_selected, "selected_chunk", lambda *a: 2)
    q, k, v = (t.detach() for t in qkv(1, 1, 3, T, T, 8, 8, torch.float64))
    idx, valid = selection(1, 1, T, 2, BS, T, True, 0)
    kb, vb = k.clone(), v.clone()
    kb[:, :, 21, 0] = poison
    vb[:, :, 30, 1] = poison
    calls = [
        (lambda k, v: selected_attention_fast(q, k, v, idx, BS, valid),
         lambda k, v: selected_attention_reference(q, k, v, idx, BS, valid)),
        (lambda k, v: sliding_window_fast(q, k, v, 3), lambda k, v: sliding_window_reference(q, k, v, 3)),
        (lambda k, v: sliding_window_fast(q, k, v, 3, causal=False),
         lambda k, v: sliding_window_reference(q, k, v, 3, causal=False)),
        (lambda k, v: compressed_attention_fast(q, k[:, :, 15:26], v[:, :, 15:26], 1, 4),
         lambda k, v: compressed_attention_chunked(q, k[:, :, 15:26], v[:, :, 15:26], 1, 4)),
    ]
    for fast, loop in calls:
        got, want, clean = fast(kb, vb), loop(kb, vb), fast(k, v)
        rows, got_rows = want.isnan().any(dim=-1), got.isnan().any(dim=-1)
        assert rows.any() and not got_rows.all()
        assert torch.equal(got_rows, rows) if poison != poison else bool((got_rows | ~rows).all())
        assert got[got_rows].isnan().all()
        assert torch.equal(got[~got_rows], clean[~got_rows])
