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
