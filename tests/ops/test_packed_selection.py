"""select_blocks on packed documents in one pass (pooled slots, the packed block top-k kernel or its
PyTorch twin) equals selecting each document alone (block_selection._select_per_document, the
exact reference), without a loop over documents: odd lengths (1, shorter than a compression or a
selection block, empty documents), groups of 1 and 3, shared and per-head selection, causal and
not; use_diff_topk's gates and their gradients in float64."""

import importlib

import pytest
import torch

from nsa_core.ops import Seqs, select_blocks
from nsa_core.ops.block_selection import _select_packed, _select_per_document
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.reference.packed_selection import packed_blocks, packed_pooled_keys
from nsa_core.reference.pooled_selection import pooled_keys
from nsa_core.selection import SelectionRule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENGTHS = [9, 1, 0, 70, 3, 40, 0, 17]  # stride 4, selection 8: 1 and 3 hold no compressed token, 9 one block


def packed(lengths) -> Seqs:
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    return Seqs.packed(cu, sum(lengths), device=DEVICE)


def inputs(G, stride, T, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2 * G, T, 8, generator=gen, dtype=torch.float64)
    ck = torch.randn(1, 2, T // stride, 8, generator=gen, dtype=torch.float64)
    return q.to(DEVICE, dtype), ck.to(DEVICE, dtype)


def assert_same_selection(got, want):
    """valid equal; per query, the same set of valid blocks with the same probabilities (a near-tie
    may order them otherwise); invalid slots past a document's blocks -1."""
    assert got.indices.shape == want.indices.shape
    assert torch.equal(got.valid, want.valid)
    assert torch.equal(got.indices == -1, want.indices == -1)
    key = lambda s: torch.where(s.valid, s.indices, -1).sort(dim=-1)
    (gi, go), (wi, wo) = key(got), key(want)
    assert torch.equal(gi, wi)
    torch.testing.assert_close(got.probs.gather(-1, go), want.probs.gather(-1, wo), rtol=1e-5, atol=1e-7)


def native_path(monkeypatch, chunk):
    """The native path reads no document bounds on the host and never runs the twin; queries in
    chunks of `chunk` (None: as many as the budget takes)."""
    def refuse(*args, **kwargs):
        raise AssertionError("packed selection looped over documents")

    monkeypatch.setattr(Seqs, "spans", refuse)
    monkeypatch.setattr(importlib.import_module("nsa_core.ops.block_selection"), "_select_per_document", refuse)
    if chunk is not None:
        monkeypatch.setattr(importlib.import_module("nsa_core.ops.block_selection"), "query_chunk_size",
                            lambda *args, **kwargs: chunk)


def spy_on_packed_kernel(monkeypatch) -> list:
    """A list that gets an entry per call of the packed top-k kernel."""
    from nsa_core.kernels import block_topk

    calls = []
    kernel = block_topk.block_topk_packed
    monkeypatch.setattr(block_topk, "block_topk_packed", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    return calls


def test_pooled_slots_hold_each_documents_pooled_keys():
    seqs, stride, sel = packed(LENGTHS), 4, 8
    _, ck = inputs(1, stride, seqs.q_len, seed=0, dtype=torch.float64)
    blocks = packed_blocks(seqs.cu_seqlens, seqs.q_len, seqs.max_seqlen, stride, sel)
    keys = packed_pooled_keys(ck, blocks)
    owned = torch.zeros(keys.shape[2], dtype=torch.bool)
    for a, b in seqs.spans():
        nb = (b - a) // sel
        alone = pooled_keys(ck[:, :, a // stride:a // stride + (b - a) // stride], sel // stride)
        assert torch.equal(keys[:, :, a // sel:a // sel + nb], alone)
        assert not owned[a // sel:a // sel + nb].any()
        owned[a // sel:a // sel + nb] = True
    assert torch.equal(blocks.used.cpu(), owned) and not keys[:, :, ~owned].any()


@pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                    reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("G, share, stride, sel, num_selected, chunk", [
    (1, True, 4, 8, 3, None), (3, True, 4, 4, 2, 37), (3, False, 2, 8, 5, None), (3, False, 4, 8, 16, 50),
])
def test_packed_kernel_equals_each_document(monkeypatch, causal, G, share, stride, sel, num_selected, chunk):
    seqs = packed(LENGTHS)
    q, ck = inputs(G, stride, seqs.q_len, seed=G + sel, dtype=torch.float32)
    rule = SelectionRule(num_selected, sel, stride, G, share, False, False, causal, 0.3)
    want = _select_per_document(q, ck, rule, seqs)
    calls = spy_on_packed_kernel(monkeypatch)
    native_path(monkeypatch, chunk)
    got = select_blocks(q, ck, rule, seqs=seqs, backend="triton")
    assert len(calls) == (1 if chunk is None else -(-seqs.q_len // chunk)) and got.gates is None
    assert_same_selection(got, want)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("G, share, chunk", [(1, True, None), (3, False, 29)])
def test_packed_twin_with_diff_topk_equals_each_document(monkeypatch, causal, G, share, chunk):
    """The pooled PyTorch twin (float64, use_diff_topk): selection, gates and their gradients
    (through the chunks' checkpoints)."""
    seqs = packed(LENGTHS)
    q, ck = inputs(G, 4, seqs.q_len, seed=G, dtype=torch.float64)
    q.requires_grad_(), ck.requires_grad_()
    rule = SelectionRule(3, 8, 4, G, share, False, True, causal, 0.3)
    want = _select_per_document(q, ck, rule, seqs)
    monkeypatch.setattr(importlib.import_module("nsa_core.ops.block_selection"), "use_kernels", lambda *a, **k: True)
    native_path(monkeypatch, chunk)
    got = select_blocks(q, ck, rule, seqs=seqs, backend="triton")
    assert_same_selection(got, want)
    assert torch.equal(got.indices, want.indices)  # float64: no near-tie
    torch.testing.assert_close(got.gates, want.gates, rtol=1e-12, atol=1e-15)
    weights = torch.randn(got.gates.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = [torch.autograd.grad((s.gates * weights).sum(), (q, ck)) for s in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_block_anywhere_is_none():
    seqs = packed([3, 0, 2])
    q, ck = inputs(1, 4, 5, seed=0, dtype=torch.float32)
    rule = SelectionRule(2, 8, 4, 1, True, False, False, True, 0.3)
    assert _select_packed(q, ck, rule, seqs) is None and _select_per_document(q, ck, rule, seqs) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, agreement", [(torch.float32, 0.999), (torch.bfloat16, 0.9)])
def test_packed_kernel_gpu(dtype, agreement):
    """Paper-like shape on the GPU: the one-pass packed selection picks each document's own blocks
    (the same valid set as selecting it alone, exactly, for all but near-tied rows: bf16 rounds the
    pooled and the exact scores apart, 97% of rows agree on CPU), -1 past them."""
    lengths = [1000, 1, 0, 3000, 77, 2048]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    seqs = Seqs.packed(cu, sum(lengths), device="cuda")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 16, seqs.q_len, 64, generator=gen).cuda()
    ck = torch.randn(1, 4, seqs.q_len // 16, 64, generator=gen).cuda()
    rule = SelectionRule(16, 64, 16, 4, True, False, False, True, 0.125)
    q, ck = q.to(dtype), ck.to(dtype)
    got = select_blocks(q, ck, rule, seqs=seqs, backend="triton")
    want = _select_per_document(q, ck, rule, seqs)
    assert torch.equal(got.indices == -1, want.indices == -1)
    key = lambda s: torch.where(s.valid, s.indices, -1).sort(dim=-1).values
    agree = (key(got) == key(want)).all(dim=-1).float().mean().item()
    assert agree >= agreement, agree


@pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                    reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")
@pytest.mark.parametrize("initial, local, chunk", [(1, 2, None), (0, 2, 23), (2, 1, 41)])
def test_packed_kernel_with_forced_blocks_equals_each_document(monkeypatch, initial, local, chunk):
    """The packed top-k kernel with forced blocks (counted from each document's start): the forced
    slots slot for slot, the rest as a set (float32: a near-tie may order them otherwise); invalid
    slots' indices are not compared (-1 or a clamped block: the attention ignores them)."""
    seqs = packed(LENGTHS)
    q, ck = inputs(3, 4, seqs.q_len, seed=initial + 3 * local, dtype=torch.float32)
    rule = SelectionRule(4, 8, 4, 3, True, False, False, True, 0.3, forced_initial=initial, forced_local=local)
    want = _select_per_document(q, ck, rule, seqs)
    calls = spy_on_packed_kernel(monkeypatch)
    native_path(monkeypatch, chunk)
    got = select_blocks(q, ck, rule, seqs=seqs, backend="triton")
    assert calls and got.indices.shape == want.indices.shape
    forced = slice(0, initial + local)
    assert torch.equal(got.valid, want.valid) and got.valid[..., forced].any()
    assert torch.equal(torch.where(got.valid, got.indices, -1)[..., forced],
                       torch.where(want.valid, want.indices, -1)[..., forced])
    rest = lambda s: torch.where(s.valid, s.indices, -1)[..., initial + local:].sort(dim=-1).values
    assert torch.equal(rest(got), rest(want))
    torch.testing.assert_close(torch.where(got.valid, got.probs, 0).sort(dim=-1).values,
                               torch.where(want.valid, want.probs, 0).sort(dim=-1).values, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("initial, local, chunk", [(1, 1, 41), (2, 0, None)])
def test_packed_twin_with_forced_blocks_and_diff_topk_equals_each_document(monkeypatch, initial, local, chunk):
    """Forced blocks with use_diff_topk (the PyTorch top-k by design), float64: all documents in one
    pass (no host read of the bounds) equal every document selected alone in every valid slot (slot
    for slot), gates and their gradients too. Invalid slots are ignored by the attention; their
    indices may differ (-1 or a clamped block)."""
    seqs = packed(LENGTHS)
    q, ck = inputs(3, 4, seqs.q_len, seed=initial + 3 * local, dtype=torch.float64)
    q.requires_grad_(), ck.requires_grad_()
    rule = SelectionRule(4, 8, 4, 3, True, False, True, True, 0.3, forced_initial=initial, forced_local=local)
    want = _select_per_document(q, ck, rule, seqs)
    monkeypatch.setattr(importlib.import_module("nsa_core.ops.block_selection"), "use_kernels", lambda *a, **k: True)
    native_path(monkeypatch, chunk)
    got = select_blocks(q, ck, rule, seqs=seqs, backend="triton")
    assert torch.equal(got.valid, want.valid) and got.valid.any()
    assert torch.equal(got.indices[got.valid], want.indices[want.valid])
    torch.testing.assert_close(got.probs[got.valid], want.probs[want.valid], rtol=1e-12, atol=1e-15)
    weights = torch.randn(got.gates.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = weights * got.valid
    torch.testing.assert_close(got.gates * got.valid, want.gates * want.valid, rtol=1e-12, atol=1e-15)
    grads = [torch.autograd.grad((s.gates * weights).sum(), (q, ck)) for s in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
