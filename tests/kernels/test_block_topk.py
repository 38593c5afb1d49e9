"""The block top-k kernel (scale, mask, softmax with the null slot, top-k) equals its PyTorch twin
(pooled_selection.mask_block_logits + selection.select_top_blocks), ties included."""

import pytest
import torch

from nsa_core.reference.pooled_selection import mask_block_logits
from nsa_core.reference.selection import NULL_SLOT_LOGIT, VALID_THRESHOLD
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.reference.selection import select_top_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                       reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)"),
    pytest.mark.usefixtures("poisoned_outputs"),
]


def twin(scores, k, scale, first_pos, sel, stride, causal):
    pos = torch.arange(first_pos, first_pos + scores.shape[-2], device=scores.device)
    logits = mask_block_logits(scores * scale, query_pos=pos, stride=stride, selection_block_size=sel, causal=causal)
    s = select_top_blocks(logits, k, use_diff_topk=False)
    return s.indices, s.valid, s.probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("NB, k, first_pos, mask_own", [(13, 4, 0, True), (13, 13, 37, False), (40, 5, 150, True),
                                                      (3, 2, 5, True)])
def test_block_topk_equals_twin(dtype, causal, NB, k, first_pos, mask_own):
    from nsa_core.kernels.block_topk import block_topk

    gen = torch.Generator().manual_seed(NB * 100 + k)
    sel, stride = 16, 8 if mask_own else 16
    # coarse values: many exact ties, which must go to the lowest block index
    scores = (torch.randint(-6, 7, (2, 3, 41, NB), generator=gen) * 0.5).to(dtype).to(DEVICE)
    scores[0, 0, :, ::3] = torch.randn(41, len(range(0, NB, 3)), generator=gen).to(dtype)
    scale = 0.37
    got = block_topk(scores, k, scale=scale, first_pos=first_pos, selection_block_size=sel, causal=causal,
                     null_logit=NULL_SLOT_LOGIT, threshold=VALID_THRESHOLD,
                     mask_own=mask_own)
    want = twin(scores, k, scale, first_pos, sel, stride, causal)
    idx, valid, probs = got
    assert idx.dtype == torch.int64 and valid.dtype == torch.bool and probs.dtype == dtype
    assert torch.equal(valid, want[1])
    assert torch.equal(torch.where(valid, idx, -1), torch.where(want[1], want[0], -1))
    torch.testing.assert_close(probs, want[2], rtol=2e-7 if dtype == torch.float32 else 2 ** -6, atol=1e-7)  # bf16: the CPU twin rounds twice


def packed_case(lengths, sel, seed, dtype):
    """Coarse random scores (1, 3, T, P) over the pooled slots of documents `lengths`, and their layout."""
    from nsa_core.reference.packed_selection import packed_blocks

    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    T = int(cu[-1])
    blocks = packed_blocks(cu.to(DEVICE), T, max(lengths), stride=sel // 2, selection_block_size=sel)
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randint(-6, 7, (1, 3, T, T // sel), generator=gen) * 0.5).to(dtype).to(DEVICE)
    return cu.tolist(), blocks, scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths, k", [([9, 1, 0, 70, 3, 40, 0, 24], 3), ([33, 0, 8, 2, 57], 16)])
def test_block_topk_packed_equals_each_document(dtype, causal, lengths, k):
    """Packed rows read their own document's window of pooled slots: each document's rows equal the
    plain twin on that document's blocks alone, slots past its blocks -1 / invalid / 0; a chunk of
    queries that starts mid-document reads its slice of the per-query tensors."""
    from nsa_core.kernels.block_topk import block_topk_packed

    sel, scale = 8, 0.37
    cu, blocks, scores = packed_case(lengths, sel, seed=k, dtype=dtype)
    start, end = 5, len(blocks.positions) - 3  # one chunk of queries
    got = block_topk_packed(scores[:, :, start:end], k, positions=blocks.positions[start:end],
                            first_slot=blocks.first_slot[start:end], num_blocks=blocks.num_blocks[start:end],
                            width=blocks.width, scale=scale, selection_block_size=sel, causal=causal, mask_own=True,
                            null_logit=NULL_SLOT_LOGIT, threshold=VALID_THRESHOLD)
    for a, b in zip(cu, cu[1:]):
        first, nb = a // sel, (b - a) // sel
        m = min(k, nb)  # the document's slots
        rows = slice(max(a, start) - start, max(min(b, end) - start, 0))
        if rows.stop <= rows.start:
            continue
        idx, valid, probs = (t[:, :, rows] for t in got)
        assert torch.equal(idx[..., m:], torch.full_like(idx[..., m:], -1))
        assert not valid[..., m:].any() and not probs[..., m:].any()
        if m == 0:
            continue
        doc_scores = scores[:, :, max(a, start):min(b, end), first:first + nb]
        want = twin(doc_scores, m, scale, max(a, start) - a, sel, sel // 2, causal)
        assert torch.equal(idx[..., :m], want[0]) and torch.equal(valid[..., :m], want[1])
        torch.testing.assert_close(probs[..., :m], want[2], rtol=2e-7 if dtype == torch.float32 else 2 ** -6,
                                   atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("NB, k, first_pos, initial, local", [(13, 4, 0, 1, 2), (40, 5, 150, 1, 2), (40, 6, 90, 2, 0),
                                                              (3, 3, 5, 1, 2), (9, 3, 20, 0, 3), (2, 2, 30, 2, 1)])
def test_block_topk_forced_blocks_equal_twin(dtype, NB, k, first_pos, initial, local):
    """Forced initial / local blocks (causal): the first slots hold them as the twin places them
    (valid where they exist before the query's own block), the others the best unforced blocks;
    more forced blocks than k keep every forced slot."""
    from nsa_core.kernels.block_topk import block_topk

    gen = torch.Generator().manual_seed(NB * 10 + initial + 3 * local)
    sel, stride = 16, 8
    scores = (torch.randint(-6, 7, (2, 3, 41, NB), generator=gen) * 0.5).to(dtype).to(DEVICE)
    scale = 0.37
    got = block_topk(scores, k, scale=scale, first_pos=first_pos, selection_block_size=sel, causal=True,
                     null_logit=NULL_SLOT_LOGIT, threshold=VALID_THRESHOLD, mask_own=True, forced_initial=initial,
                     forced_local=local)
    pos = torch.arange(first_pos, first_pos + scores.shape[-2], device=scores.device)
    logits = mask_block_logits(scores * scale, query_pos=pos, stride=stride, selection_block_size=sel, causal=True)
    want = select_top_blocks(logits, k, use_diff_topk=False, forced=(sel, initial, local, pos))
    idx, valid, probs = got
    assert idx.shape == want.indices.shape and want.valid[..., :initial + local].any()
    assert torch.equal(valid, want.valid)
    assert torch.equal(torch.where(valid, idx, -1), torch.where(want.valid, want.indices, -1))
    torch.testing.assert_close(torch.where(valid, probs, 0), torch.where(want.valid, want.probs, 0),
                               rtol=2e-7 if dtype == torch.float32 else 2 ** -6, atol=1e-7)
