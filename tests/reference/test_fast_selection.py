"""The fast block selection (reference/fast_selection.py) against the exact reference it is the twin
of (reference/selection.py): float64 (no near-tie can flip a block), odd lengths, GQA groups 1 and
3, shared and per-head selection, causal and not, query offsets, forced blocks, use_diff_topk's
gates and their gradients, chunks of a few queries, exact ties, NaN; and the op's PyTorch side runs it."""

import importlib

import pytest
import torch

from nsa_core.ops import Seqs, select_blocks
from nsa_core.ops.block_selection import _select_per_document
from nsa_core.reference.fast_selection import SEGMENT, largest, select_blocks_fast
from nsa_core.reference.selection import SelectionRule, select_blocks_reference


def slots_by_block(s):
    """The valid slots' blocks, sorted, and the order that sorts them (invalid slots: -1)."""
    return torch.where(s.valid, s.indices, -1).sort(dim=-1)


def assert_same(got, want, rtol=1e-10, atol=1e-12):
    """Same valid flags, the same valid blocks in the same order, the same probabilities."""
    assert (got is None) == (want is None)
    if want is None:
        return
    assert got.indices.shape == want.indices.shape
    assert torch.equal(got.valid, want.valid)
    assert torch.equal(torch.where(got.valid, got.indices, -1), torch.where(want.valid, want.indices, -1))
    torch.testing.assert_close(torch.where(got.valid, got.probs, 0), torch.where(want.valid, want.probs, 0),
                               rtol=rtol, atol=atol)


def inputs(B, HKV, G, T, C, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HKV * G, T, 8, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    ck = torch.randn(B, HKV, C, 8, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return q, ck


CASES = [  # G, share, causal, selection block, stride, T, q_offset, slots, (forced initial, local), diff
    (3, True, True, 8, 4, 37, 0, 3, (0, 0), False),
    (3, False, True, 12, 4, 70, 9, 2, (0, 0), True),
    (1, True, True, 4, 4, 53, 0, 3, (0, 0), False),
    (3, True, False, 8, 4, 45, 0, 2, (0, 0), True),
    (1, False, False, 4, 4, 29, 5, 4, (0, 0), False),
    (3, True, True, 8, 4, 61, 3, 4, (1, 2), True),
    (1, True, True, 16, 8, 5, 0, 2, (0, 0), False),  # fewer queries than a selection block: nothing to select
    (3, False, True, 8, 8, 83, 0, 1, (0, 0), False),
]


@pytest.mark.parametrize("chunk_budget", [1 << 22, 700])  # one chunk; chunks of a few queries
@pytest.mark.parametrize("case", CASES)
def test_fast_selection_equals_reference(case, chunk_budget):
    G, share, causal, sel, stride, T, off, S, forced, diff = case
    q, ck = inputs(2, 2, G, T, (T + off) // stride, seed=T)
    rule = SelectionRule(S, sel, stride, G, share, False, diff, causal, 0.3, *forced)
    want = select_blocks_reference(q, ck, rule, q_offset=off)
    got = select_blocks_fast(q, ck, rule, q_offset=off, budget=chunk_budget)
    assert_same(got, want)
    if diff:  # the gates' gradients (a gate is 1 forward; its gradient is the probability's)
        grad = torch.randn(want.gates.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        loss = lambda s: (torch.where(s.valid, s.gates, 0) * grad.gather(-1, slots_by_block(s).indices)).sum()
        for a, b in zip(torch.autograd.grad(loss(got), (q, ck)), torch.autograd.grad(loss(want), (q, ck))):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("share, G", [(False, 3), (True, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_exact_ties_pick_the_lowest_block(share, G, causal):
    """Integer-valued queries and keys (many exact ties, rows of zeros, equal keys): the same blocks
    as the reference's rule, lowest block first among equal probabilities, in float32."""
    gen = torch.Generator().manual_seed(G)
    q = torch.randn(1, 2 * G, 45, 8, generator=gen).round()
    q[:, :, ::3] = 0
    ck = torch.randn(1, 2, 11, 8, generator=gen).round()
    ck[:, :, 4] = ck[:, :, 6] = ck[:, :, 1]
    for S in (1, 2, 3):
        rule = SelectionRule(S, 4, 4, G, share, False, False, causal, 0.5)
        assert_same(select_blocks_fast(q, ck, rule, budget=300), select_blocks_reference(q, ck, rule),
                    rtol=1e-5, atol=1e-7)


def test_non_finite_scores_give_invalid_slots():
    """A NaN query and an infinite compressed key: the same valid flags as the reference, and the
    queries that cannot see the infinite key keep their selection."""
    q, ck = (t.detach().float() for t in inputs(1, 2, 3, 45, 11, seed=3))
    q[:, :, 20] = float("nan")
    ck[:, :, 6] = float("inf")
    rule = SelectionRule(2, 4, 4, 3, True, False, False, True, 0.5)
    got, want = select_blocks_fast(q, ck, rule, budget=300), select_blocks_reference(q, ck, rule)
    assert torch.equal(got.valid, want.valid)
    assert not got.valid[:, :, 20].any()
    early = slice(0, 20)
    assert_same(*(type(s)(*(None if t is None else t[:, :, early] for t in (s.indices, s.valid, s.probs, s.gates)))
                  for s in (got, want)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("width", [5 * SEGMENT, 17 * SEGMENT + 29])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_largest_equals_topk(width, m):
    """The segment-maxima top-k: the same values as topk (ties included), at distinct indices that
    hold them; rows of one repeated value, and the largest values in the tail."""
    gen = torch.Generator().manual_seed(width + m)
    x = torch.randint(0, 40, (6, width), generator=gen).float()
    x[1] = 7.0
    x[2, -3:] = 50.0
    x[3, :: SEGMENT] = 60.0  # one equal maximum in every segment
    values, indices = largest(x, m)
    torch.testing.assert_close(values, x.topk(m, dim=-1).values, rtol=0, atol=0)
    assert torch.equal(x.gather(-1, indices), values)
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all()


def test_fast_selection_equals_reference_on_a_long_row():
    """Rows of more blocks than `largest` takes whole (its segments run): 2,111 queries, 527 blocks."""
    q, ck = (t.detach() for t in inputs(1, 2, 3, 2111, 527, seed=5))
    for share, S in ((True, 1), (False, 1)):
        rule = SelectionRule(S, 4, 4, 3, share, False, False, True, 0.3)
        assert_same(select_blocks_fast(q, ck, rule), select_blocks_reference(q, ck, rule))


def test_selection_blocks_smaller_than_the_stride_are_refused():
    q, ck = inputs(1, 1, 1, 9, 2)
    with pytest.raises(ValueError, match="multiple of the stride"):
        select_blocks_fast(q, ck, SelectionRule(2, 2, 4, 1, True, False, False, True, 0.3))


def test_the_ops_pytorch_side_runs_the_fast_selection(monkeypatch):
    """select_blocks on CPU (rows and packed documents) goes through select_blocks_fast for selection
    blocks a multiple of the stride, through the reference for smaller ones."""
    op = importlib.import_module("nsa_core.ops.block_selection")
    calls = []
    fast = op.select_blocks_fast
    monkeypatch.setattr(op, "select_blocks_fast", lambda *a, **k: calls.append("fast") or fast(*a, **k))
    q, ck = (t.detach() for t in inputs(1, 2, 3, 40, 10))
    rule = SelectionRule(2, 8, 4, 3, True, False, False, True, 0.3)
    assert_same(select_blocks(q, ck, rule, backend="torch"), select_blocks_reference(q, ck, rule))
    cu = torch.tensor([0, 13, 14, 40])
    seqs = Seqs.packed(cu, 40)
    assert_same(select_blocks(q, ck, rule, seqs=seqs, backend="torch"), _select_per_document(q, ck, rule, seqs))
    assert calls == ["fast"] * 4  # the row, then each document (the one-token document has no block)
    select_blocks(q, torch.cat((ck, ck), dim=-2), SelectionRule(2, 2, 4, 3, True, False, False, True, 0.3),
                  backend="torch")
    assert len(calls) == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocks", [1, 37, 300])
def test_sixteen_bit_top_k_keys_order_as_the_float32_ones(dtype, blocks):
    """The int32 keys of 16-bit probabilities pick the blocks the float32 keys pick: the largest,
    ties (many here: a coarse grid with zeros) to the lowest index."""
    from nsa_core.reference.selection import top_indices_lowest_first

    gen = torch.Generator().manual_seed(blocks)
    probs = (torch.randint(0, 6, (3, 5, blocks), generator=gen) / 8.0).to(dtype)
    k = min(4, blocks)
    got = top_indices_lowest_first(probs, k)
    want = top_indices_lowest_first(probs.float(), k)
    assert torch.equal(got, want)
    ranked = torch.stack((-probs.float(), torch.arange(blocks).expand_as(probs).float()), dim=-1)
    for row, chosen in zip(ranked.flatten(0, 1), got.flatten(0, 1)):  # by hand: sort by (-p, index)
        order = sorted(range(blocks), key=lambda i: (row[i, 0].item(), i))[:k]
        assert chosen.tolist() == order
