"""Two selections merged on the kernel (kernels/selection_merge.py through ops/selection_merge.py) equal
the PyTorch merge (selection.merge_selections) exactly: blocks both hold, invalid slots with ids that
repeat valid ones, rows past one program's, slot counts that are not powers of two, int32 / int64 ids."""

import pytest
import torch

from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.ops.selection_merge import merge_selection_slots
from nsa_core.selection import Selection, merge_selections

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                                reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")


def selection(lead, slots, blocks, gen, index_dtype, probs_dtype):
    indices = torch.randint(0, blocks, (*lead, slots), generator=gen).to(index_dtype)
    valid = torch.rand(*lead, slots, generator=gen) < 0.7
    probs = torch.rand(*lead, slots, generator=gen).to(probs_dtype)
    return Selection(indices=indices.to(DEVICE), valid=valid.to(DEVICE), probs=probs.to(DEVICE), gates=None)


@pytest.mark.parametrize("lead, s1, s2", [((2, 3, 5), 4, 3), ((1, 2, 130), 6, 1), ((3, 1, 1), 13, 6), ((1, 1, 7), 0, 3)])
@pytest.mark.parametrize("index_dtype, probs_dtype", [(torch.int64, torch.float32), (torch.int32, torch.bfloat16)])
def test_kernel_merge_equals_the_pytorch_merge(lead, s1, s2, index_dtype, probs_dtype):
    gen = torch.Generator().manual_seed(s1 * 10 + s2)
    first = selection(lead, s1, 6, gen, index_dtype, probs_dtype)  # 6 blocks: many shared ids
    second = selection(lead, s2, 6, gen, index_dtype, probs_dtype)
    want = merge_selections(first, second)
    got = merge_selection_slots(first, second, backend="triton")
    for name in ("indices", "valid", "probs"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert got.gates is None
    if s1 and s2:
        held = (second.indices.unsqueeze(-1) == first.indices.unsqueeze(-2)) & first.valid.unsqueeze(-2)
        assert held.any() and (second.valid & held.any(-1)).any()  # the case where a slot is dropped occurs


def test_none_and_mismatches_take_the_reference():
    gen = torch.Generator().manual_seed(0)
    first = selection((1, 2, 3), 2, 5, gen, torch.int64, torch.float32)
    assert merge_selection_slots(None, first, backend="triton") is first
    assert merge_selection_slots(first, None, backend="triton") is first
    with pytest.raises(ValueError, match="share \\(B, H, T\\)"):
        merge_selection_slots(first, selection((1, 2, 4), 2, 5, gen, torch.int64, torch.float32), backend="triton")
    with pytest.raises(ValueError, match="different index or probability dtypes"):
        merge_selection_slots(first, selection((1, 2, 3), 2, 5, gen, torch.int32, torch.float32), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_merge_gpu_training_shape():
    """A training pass's selections (batch 2, 4 kv heads, 4096 queries, 13 + 6 slots over 64 blocks)."""
    gen = torch.Generator().manual_seed(1)
    first = selection((2, 4, 4096), 13, 64, gen, torch.int64, torch.float32)
    second = selection((2, 4, 4096), 6, 64, gen, torch.int64, torch.float32)
    want, got = merge_selections(first, second), merge_selection_slots(first, second, backend="triton")
    for name in ("indices", "valid", "probs"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
