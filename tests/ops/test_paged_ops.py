"""The branch ops over a cache's pages (a decoding-step Seqs, keys as nsa_core.ops.paged.Pages) equal
the same ops over token tensors, row by row, with the row's queries after its cached keys
(Seqs(K, L + K, L)): ragged rows, pages in a shuffled pool, junk past every row's length, groups of 3;
float64 on the PyTorch path, the paged kernels through the interpreter (outputs poisoned). Also
Seqs.step's checks and the ops' errors for keys and descriptors that do not go together."""

import pytest
import torch

from nsa_core.ops import Seqs, compressed_attention, select_blocks, selected_attention, sliding_window_attention
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.ops.paged import Pages, PooledBlockKeys
from nsa_core.selection import SelectionRule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = kernel_unavailable_reason(torch.device(DEVICE)) is None
HQ, HKV, K, MEM = 6, 2, 3, 2


def paged(k: torch.Tensor, v: torch.Tensor, page: int, gen) -> tuple[Pages, Pages]:
    """k, v (B, HKV, N, D), N a multiple of page -> the same tokens in shuffled pools behind one block
    table (page 0, the null page, and every page's junk random)."""
    B, H, N, D = k.shape
    per_row = N // page
    physical = torch.randperm(B * per_row, generator=gen) + 1
    table = physical.view(B, per_row).to(DEVICE, torch.int32)
    pages = []
    for full in (k, v):
        pool = torch.randn(B * per_row + 1, H, page, D, generator=gen, dtype=full.dtype)
        pool[physical] = full.unflatten(2, (per_row, page)).transpose(1, 2).flatten(0, 1)
        pages.append(Pages(pool.to(DEVICE), table))
    return tuple(pages)


def setup(lengths, capacity, page, dtype, seed=0, D=8):
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q = torch.randn(B, HQ, K, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, HKV, capacity, D, generator=gen, dtype=torch.float64) for _ in range(2))
    pages = paged(k.to(dtype), v.to(dtype), page, gen)
    seqs = Seqs.step(torch.tensor(lengths, device=DEVICE), K, capacity)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), pages, seqs, gen


def rows(op, q, k, v, lengths, **kwargs):
    """op over token tensors, row by row: row b's K queries after its lengths[b] keys."""
    outs = [op(q[b:b + 1], k[b:b + 1, :, :n + K], v[b:b + 1, :, :n + K], seqs=Seqs(K, n + K, n), **kwargs)
            for b, n in enumerate(lengths)]
    return torch.cat(outs)


def random_selection(lengths, block, S, gen):
    """(B, HKV, K, S) distinct blocks before each query's own block, some slots invalid."""
    B = len(lengths)
    indices = torch.zeros(B, HKV, K, S, dtype=torch.long)
    valid = torch.zeros(B, HKV, K, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        for h in range(HKV):
            for i in range(K):
                before = (n + i) // block
                chosen = torch.randperm(before, generator=gen)[:S] if before else torch.zeros(0, dtype=torch.long)
                indices[b, h, i, :len(chosen)] = chosen
                valid[b, h, i, :len(chosen)] = torch.rand(len(chosen), generator=gen) < 0.8
    return indices.to(DEVICE), valid.to(DEVICE)


CASES = [  # (lengths, capacity, page, dtype, backend)
    ([5, 17, 30], 40, 4, torch.float64, "torch"),
    pytest.param([20, 37, 50], 64, 16, torch.float32, "triton",
                 marks=pytest.mark.skipif(not KERNELS, reason="kernels cannot run here")),
]


def close(got, reference):
    """got within 4x the error of the tensor op's PyTorch path at got's dtype (float64 as exact), and
    8 ulps: `reference(dtype)` computes it from the same inputs cast to dtype."""
    assert torch.isfinite(got).all()
    exact = reference(torch.float64)
    own = (reference(got.dtype).double() - exact).abs().max().item()
    tol = max(4 * own, 8 * torch.finfo(got.dtype).eps)
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=tol)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("lengths, capacity, page, dtype, backend", CASES)
def test_window_over_pages_equals_tensors(lengths, capacity, page, dtype, backend):
    q, k, v, (kp, vp), seqs, _ = setup(lengths, capacity, page, dtype, D=8 if page == 4 else 16)
    for window in (3, page + 1):
        got = sliding_window_attention(q, kp, vp, window=window, seqs=seqs, backend=backend)
        close(got, lambda dt: rows(sliding_window_attention, *(t.to(dt) for t in (q, k, v)), lengths, window=window,
                                   backend="torch"))


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("lengths, capacity, page, dtype, backend", CASES)
def test_selected_over_pages_equals_tensors(lengths, capacity, page, dtype, backend):
    q, k, v, (kp, vp), seqs, gen = setup(lengths, capacity, page, dtype, seed=1, D=8 if page == 4 else 16)
    indices, valid = random_selection(lengths, page, 2, gen)
    got = selected_attention(q, kp, vp, indices, valid=valid, block_size=page, seqs=seqs, backend=backend)
    def reference(dt):
        q_, k_, v_ = (t.to(dt) for t in (q, k, v))
        return torch.cat([selected_attention(q_[b:b + 1], k_[b:b + 1, :, :n + K], v_[b:b + 1, :, :n + K],
                                             indices[b:b + 1], valid=valid[b:b + 1], block_size=page,
                                             seqs=Seqs(K, n + K, n), backend="torch") for b, n in enumerate(lengths)])

    close(got, reference)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("lengths, capacity, page, dtype, backend", CASES)
def test_compressed_over_pages_equals_tensors(lengths, capacity, page, dtype, backend):
    stride = 4
    gen = torch.Generator().manual_seed(2)
    D = 8 if page == 4 else 16
    q = torch.randn(len(lengths), HQ, K, D, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    slots = 2 * page * -(-(MEM + capacity // stride) // (2 * page))  # whole pages, two per row at least
    ck, cv = (torch.randn(len(lengths), HKV, slots, D, generator=gen, dtype=torch.float64) for _ in range(2))
    ckp, cvp = paged(ck.to(dtype), cv.to(dtype), page, gen)
    seqs = Seqs.step(torch.tensor(lengths, device=DEVICE), K, capacity)
    got = compressed_attention(q, ckp, cvp, num_memory=MEM, stride=stride, seqs=seqs, backend=backend)
    ck, cv = (t[:, :, :MEM + capacity // stride].to(DEVICE, dtype) for t in (ck, cv))

    def reference(dt):
        q_, ck_, cv_ = (t.to(dt) for t in (q, ck, cv))
        return torch.cat([compressed_attention(q_[b:b + 1], ck_[b:b + 1], cv_[b:b + 1], num_memory=MEM, stride=stride,
                                               seqs=Seqs(K, n + K, n), backend="torch") for b, n in enumerate(lengths)])

    close(got, reference)


def test_step_selection_equals_tensor_selection():
    """select_blocks of a decoding step (the cache's pooled block keys) selects what the tensor path
    selects for each row's queries after its keys; the step's extra slots (blocks not reached yet) invalid."""
    lengths, capacity, stride, block = [7, 22, 41], 48, 2, 4
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, HQ, K, 8, generator=gen, dtype=torch.float64)
    ck = torch.randn(3, HKV, capacity // stride, 8, generator=gen, dtype=torch.float64)
    rule = SelectionRule(num_selected=3, selection_block_size=block, stride=stride, group_size=HQ // HKV,
                         share_across_group=True, interpolated=False, use_diff_topk=False, causal=True, scale=0.3)
    pooled = PooledBlockKeys(ck.unflatten(2, (-1, block // stride)).mean(dim=3))
    step = select_blocks(q, pooled, rule, seqs=Seqs.step(torch.tensor(lengths), K, capacity))
    for b, n in enumerate(lengths):
        alone = select_blocks(q[b:b + 1], ck[b:b + 1, :, :(n + K) // stride], rule, seqs=Seqs(K, n + K, n))
        S = alone.indices.shape[-1]
        assert torch.equal(step.valid[b:b + 1, ..., :S], alone.valid)
        assert not step.valid[b:b + 1, ..., S:].any()
        assert torch.equal(torch.where(alone.valid, step.indices[b:b + 1, ..., :S], -1),
                           torch.where(alone.valid, alone.indices, -1))
        torch.testing.assert_close(step.probs[b:b + 1, ..., :S][alone.valid], alone.probs[alone.valid])


def test_seqs_step():
    lengths = torch.tensor([4, 0, 9])
    seqs = Seqs.step(lengths, 2, 16)
    assert seqs.is_step and not seqs.is_plain and not seqs.is_packed and (seqs.q_len, seqs.k_len) == (2, 16)
    assert seqs.query_positions("cpu").tolist() == [[4, 5], [0, 1], [9, 10]]
    assert Seqs.step(lengths.int(), 1, 1).query_positions("cpu").dtype == torch.int64
    with pytest.raises(ValueError, match="no host-side spans"):
        seqs.spans()
    with pytest.raises(ValueError, match="keys are in its cache"):
        seqs.key_positions("cpu")
    for bad, error, match in [
        (dict(lengths=[4, 0]), TypeError, "lengths must be an int32 or int64 torch.Tensor"),
        (dict(lengths=torch.tensor([1.0])), TypeError, "lengths must be int32 or int64"),
        (dict(lengths=torch.zeros(2, 1, dtype=torch.long)), ValueError, "lengths must be 1-D"),
        (dict(lengths=torch.zeros(0, dtype=torch.long)), ValueError, "lengths must be 1-D"),
        (dict(new_tokens=0), ValueError, "new_tokens must be a positive int"),
        (dict(new_tokens=True), ValueError, "new_tokens must be a positive int"),
        (dict(capacity=2.0), ValueError, "capacity must be a positive int"),
        (dict(new_tokens=5, capacity=4), ValueError, "new_tokens=5 do not fit"),
    ]:
        args = dict(lengths=lengths, new_tokens=2, capacity=16) | bad
        with pytest.raises(error, match=match):
            Seqs.step(**args)
    with pytest.raises(ValueError, match="no q_offset"):
        Seqs(2, 16, 1, cached=lengths)


def test_paged_errors():
    q, k, v, (kp, vp), seqs, _ = setup([5, 17, 30], 40, 4, torch.float64)
    window = dict(window=3, backend="torch")
    with pytest.raises(ValueError, match="k, v in pages .* need a decoding-step seqs"):
        sliding_window_attention(q, kp, vp, seqs=Seqs(K, 40, 5), **window)
    with pytest.raises(TypeError, match="v must be a nsa_core.ops.paged.Pages"):
        sliding_window_attention(q, kp, v, seqs=seqs, **window)
    with pytest.raises(TypeError, match="k must be a nsa_core.ops.paged.Pages"):
        sliding_window_attention(q, k, v, seqs=seqs, **window)
    with pytest.raises(ValueError, match="causal"):
        sliding_window_attention(q, kp, vp, seqs=seqs, causal=False, **window)
    with pytest.raises(ValueError, match="holds 3 rows"):
        sliding_window_attention(q[:2], kp, vp, seqs=seqs, **window)
    with pytest.raises(ValueError, match="2 queries per row"):
        sliding_window_attention(q, kp, vp, seqs=Seqs.step(seqs.cached, 2, 40), **window)
    with pytest.raises(ValueError, match="block_size=8"):
        selected_attention(q, kp, vp, torch.zeros(3, HKV, K, 1, dtype=torch.long), block_size=8, seqs=seqs)
    with pytest.raises(ValueError, match="without gates"):
        selected_attention(q, kp, vp, torch.zeros(3, HKV, K, 1, dtype=torch.long), block_size=4, seqs=seqs,
                           gates=torch.ones(3, HKV, K, 1, dtype=q.dtype))
    with pytest.raises(TypeError, match="cv must be a nsa_core.ops.paged.Pages"):
        compressed_attention(q, kp, v, num_memory=1, stride=4, seqs=seqs)
    with pytest.raises(TypeError, match="Pages.table must be an int32 or int64"):
        Pages(kp.pool, kp.table.float())
    with pytest.raises(TypeError, match="Pages.pool must be a floating tensor"):
        Pages(kp.pool[0], kp.table)
    rule = SelectionRule(num_selected=2, selection_block_size=4, stride=4, group_size=3, share_across_group=True,
                         interpolated=False, use_diff_topk=False, causal=True, scale=0.3)
    with pytest.raises(TypeError, match="ck must be that"):
        select_blocks(q, k, rule, seqs=seqs)
    with pytest.raises(TypeError, match="needs a decoding-step seqs"):
        select_blocks(q, PooledBlockKeys(k), rule, seqs=Seqs(K, 40, 5))


def test_pooled_block_keys_take_keys_or_pages_with_a_table():
    keys = torch.randn(2, 3, 4, 8)
    pages, table = torch.randn(9, 3, 8), torch.tensor([[8, 0, 3, 1], [2, 7, 5, 4]], dtype=torch.int32)
    paged = PooledBlockKeys(pages=pages, table=table)
    assert paged.shape == (2, 3, 4, 8) and paged.dtype == pages.dtype and paged.device == pages.device
    assert torch.equal(paged.keys[1, :, 2], pages[5])
    for bad in (dict(keys=keys, pages=pages, table=table), dict(pages=pages), dict(), dict(pages=keys, table=table)):
        with pytest.raises(ValueError, match="PooledBlockKeys"):
            PooledBlockKeys(**bad)
