"""The fused decoding-step kernel (kernels/decode/compressed_selection.py: compressed attention,
block scores and top-k in one launch) equals its twin (reference.step_selection.
step_compressed_selection_reference): odd lengths, ragged rows, groups of 3 heads, both importance
scores, selection blocks larger than, equal to and smaller than the stride, forced blocks, shared
and per-head selections; outputs poisoned with NaN. Indices are compared slot by slot: a slot may
differ only where the two blocks' exact (float64) probabilities are within twice the twin's own
error at that dtype (a near-tie); elsewhere they are equal."""

from __future__ import annotations

import math

import pytest
import torch

from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.reference.compressed_attention import compressed_scores
from nsa_core.reference.selection import NULL_SLOT_LOGIT, VALID_THRESHOLD, block_importance, num_scored_blocks
from nsa_core.reference.step_selection import paged_slots, step_compressed_selection_reference
from nsa_core.selection import SelectionRule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                                reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)")


def step_problem(*, lengths=(37, 5, 90), HKV=2, G=3, K=1, D=16, M=1, stride=4, sel=8, cblock=8, selected=3,
                 capacity=100, cpage=8, importance="mean_logits", share=True, forced=(0, 0), interpolated=False,
                 dtype=torch.float32, seed=0, device=DEVICE):
    """A batch of rows at ragged positions over a shuffled pool of compressed pages."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    C = capacity // stride
    pages = -(-(M + C + 1) // cpage)
    table = torch.randperm(B * pages, generator=gen).view(B, pages).int()
    ck = torch.randn(B * pages, HKV, cpage, D, generator=gen)
    cv = torch.randn(B * pages, HKV, cpage, D, generator=gen)
    q = torch.randn(B, HKV * G, K, D, generator=gen)
    positions = torch.tensor(lengths)[:, None] + torch.arange(K)
    assert int(positions.max()) < capacity
    rule = SelectionRule(num_selected=selected, selection_block_size=sel, stride=stride, group_size=G,
                         share_across_group=share, interpolated=interpolated, use_diff_topk=False, causal=True,
                         scale=D ** -0.5, forced_initial=forced[0], forced_local=forced[1], importance=importance,
                         compress_block=cblock)
    to = dict(device=device)
    return dict(q=q.to(dtype=dtype, **to), ck=ck.to(dtype=dtype, **to), cv=cv.to(dtype=dtype, **to),
                table=table.to(**to), positions=positions.to(**to), rule=rule, M=M, C=C)


def slots_of(p) -> int:
    rule = p["rule"]
    k = min(rule.num_selected, num_scored_blocks(p["C"], rule.stride, rule.selection_block_size))
    return max(k, rule.forced_initial + rule.forced_local)


def run_kernel(p, num_splits=None):
    from nsa_core.kernels.decode.compressed_selection import compressed_selection_step

    rule = p["rule"]
    return compressed_selection_step(
        p["q"], p["ck"], p["cv"], p["table"], p["positions"], num_memory=p["M"], num_compressed=p["C"],
        stride=rule.stride, selection_block_size=rule.selection_block_size, compress_block=rule.compress_block,
        importance=rule.importance, interpolated=rule.interpolated, share=rule.share_across_group, slots=slots_of(p),
        forced_initial=rule.forced_initial, forced_local=rule.forced_local, scale=rule.scale,
        null_logit=NULL_SLOT_LOGIT, threshold=VALID_THRESHOLD, num_splits=num_splits)


def run_twin(p, dtype=None):
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    return step_compressed_selection_reference(cast(p["q"]), cast(p["ck"]), cast(p["cv"]), p["table"],
                                               p["positions"], p["rule"], num_memory=p["M"], num_compressed=p["C"],
                                               scale=p["rule"].scale)


def exact_block_probs(p) -> torch.Tensor:
    """Every block's probability (B, H, K, NB) in float64 from the exact compressed logits."""
    rule, B = p["rule"], p["q"].shape[0]
    slots = p["M"] + torch.arange(p["C"], device=p["q"].device).expand(B, -1)
    keys = paged_slots(p["ck"].double(), p["table"], slots)
    scores = compressed_scores(p["q"].double(), keys, rule.stride, True, rule.scale, p["positions"])
    logits = block_importance(scores, group_size=rule.group_size, share_across_group=rule.share_across_group,
                              stride=rule.stride, selection_block_size=rule.selection_block_size,
                              interpolated=rule.interpolated,
                              causal=True, query_pos=p["positions"], importance=rule.importance,
                              compress_block=rule.compress_block)
    null = torch.full_like(logits[..., :1], NULL_SLOT_LOGIT)
    return torch.cat((null, logits), dim=-1).softmax(dim=-1)[..., 1:]


def check_selection(got_indices, got_valid, got_probs, want, exact, forced):
    """Slot by slot: equal indices, or two blocks within twice the twin's error of each other (at
    least one rounding of the largest probability at the twin's dtype)."""
    err = (want.probs.double() - exact.gather(-1, want.indices)).abs().max().item()
    tol = 2 * max(err, torch.finfo(want.probs.dtype).eps * exact.max().item())  # at least one rounding
    assert got_indices.shape == want.indices.shape and got_indices.dtype == torch.int64
    assert torch.equal(got_indices[..., :forced], want.indices[..., :forced])
    assert torch.equal(got_valid[..., :forced], want.valid[..., :forced])
    differ = got_indices != want.indices
    gap = (exact.gather(-1, got_indices) - exact.gather(-1, want.indices)).abs()
    assert bool((gap[differ] <= tol).all()), f"{int(differ.sum())} slots differ beyond a near-tie (tol {tol:.2e})"
    assert (got_probs.double() - exact.gather(-1, got_indices)).abs().max().item() <= tol
    ranked = exact.gather(-1, got_indices)[..., forced:]  # the slots after the forced ones
    clear = (ranked - VALID_THRESHOLD).abs() > tol
    assert torch.equal(got_valid[..., forced:][clear], (ranked > VALID_THRESHOLD)[clear])
    return int(differ.sum())


CASES = {
    "pooled": dict(),
    "pooled_tokens3_mem2": dict(K=3, M=2, lengths=(37, 4, 91)),
    "equal_stride": dict(stride=4, sel=4, cblock=4, selected=4),
    "smaller_than_stride": dict(stride=4, sel=2, cblock=8, selected=4, lengths=(37, 6, 91)),
    "interpolated": dict(stride=8, sel=2, cblock=8, selected=5, lengths=(37, 6, 91), interpolated=True, K=2),
    "interpolated_per_head": dict(stride=4, sel=2, cblock=8, selected=3, interpolated=True, share=False, HKV=1),
    "summed": dict(importance="summed_probs"),
    "summed_overlap_equal": dict(importance="summed_probs", stride=4, sel=4, cblock=8, K=2),
    "summed_smaller": dict(importance="summed_probs", stride=4, sel=2, cblock=8, lengths=(37, 6, 91)),
    "forced": dict(forced=(1, 2), selected=4, K=2),
    "summed_forced": dict(importance="summed_probs", forced=(1, 2), selected=5),
    "forced_more_than_4": dict(forced=(2, 4), selected=8, K=2, lengths=(37, 5, 90)),  # two chunks of forced slots
    "per_head": dict(share=False, G=3, HKV=1, K=2),
    "one_kv_head_big_group": dict(HKV=1, G=5, M=3, D=24, lengths=(63,)),
}


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_equals_twin(case):
    p = step_problem(**CASES[case])
    out, indices, valid, probs = run_kernel(p)
    want_out, want = run_twin(p)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    check_selection(indices, valid, probs, want, exact_block_probs(p), p["rule"].forced_initial + p["rule"].forced_local)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("num_splits", [None, 2])
def test_exact_ties_go_to_the_lowest_block(num_splits):
    """Equal compressed keys give every block the same probability: the slots take blocks 0, 1, 2, ... as
    the twin does (the top-k's key orders ties by index), after the forced ones."""
    p = step_problem(forced=(1, 1), selected=5, K=2)
    p["ck"] = p["ck"][:, :, :1].expand_as(p["ck"]).contiguous()
    out, indices, valid, probs = run_kernel(p, num_splits=num_splits)
    _, want = run_twin(p)
    assert torch.equal(indices, want.indices) and torch.equal(valid, want.valid)
    torch.testing.assert_close(probs, want.probs)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("case, num_splits", [("pooled", None), ("forced", None), ("summed_forced", None),
                                              ("per_head", None), ("forced_more_than_4", None), ("ties", 2),
                                              ("ties", None), ("split_forced", 3)])
def test_sorted_top_k_equals_the_slot_loop(monkeypatch, case, num_splits):
    """SORTED_TOP_K (one tl.topk of packed keys) makes the same choices as the max / min per slot, bit for bit,
    exact ties (equal keys: every block the same probability) and forced blocks included."""
    from nsa_core.kernels.decode import compressed_selection

    settings = dict(CASES, ties=dict(forced=(1, 1), selected=5, K=2),
                    split_forced=SPLIT_CASES["forced_tokens2_mem2"])[case]
    p = step_problem(**settings)
    if case == "ties":
        p["ck"] = p["ck"][:, :, :1].expand_as(p["ck"]).contiguous()
    loop = run_kernel(p, num_splits=num_splits)
    monkeypatch.setattr(compressed_selection, "SORTED_TOP_K", True)
    sorted_top = run_kernel(p, num_splits=num_splits)
    for name, a, b in zip(("out", "indices", "valid", "probs"), sorted_top, loop):
        assert torch.equal(a, b), name


# Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584): float16 on the CPU
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("case", ["pooled", "summed_forced", "smaller_than_stride", "interpolated"])
def test_kernel_half_precision(case):
    """16-bit: the output's error (vs float64) within twice the twin's at that dtype; indices as
    above, near-ties measured by the twin's 16-bit error."""
    p = step_problem(**CASES[case], dtype=HALF)
    out, indices, valid, probs = run_kernel(p)
    want_out, want = run_twin(p)
    exact_out, _ = run_twin(p, torch.float64)
    assert out.dtype == HALF and probs.dtype == HALF
    twin_err = (want_out.double() - exact_out).abs().max().item()
    assert (out.double() - exact_out).abs().max().item() <= 2 * twin_err + 1e-6
    check_selection(indices, valid, probs, want, exact_block_probs(p), p["rule"].forced_initial + p["rule"].forced_local)


def poison_invisible_slots(p) -> None:
    """NaN in every compressed slot after each row's last visible one."""
    hi = p["M"] + p["positions"] // p["rule"].stride - 1  # (B, 1)
    cpage = p["ck"].shape[2]
    for b in range(p["q"].shape[0]):
        for slot in range(int(hi[b].max()) + 1, p["table"].shape[1] * cpage):
            page = int(p["table"][b, slot // cpage])
            p["ck"][page, :, slot % cpage] = float("nan")
            p["cv"][page, :, slot % cpage] = float("nan")


# several slot tiles (64 slots each): 151 slots with capacity 600 at stride 4
SPLIT_CASES = {
    "pooled": dict(capacity=600, lengths=(37, 5, 590)),
    "forced_tokens2_mem2": dict(capacity=600, lengths=(300, 5, 590), K=2, M=2, forced=(1, 2), selected=4),
    "interpolated": dict(capacity=600, stride=8, sel=2, cblock=8, selected=5, lengths=(37, 260, 591),
                         interpolated=True),
    "per_head": dict(capacity=600, share=False, G=3, HKV=1, lengths=(590, 130)),
    "smaller_than_stride": dict(capacity=600, stride=4, sel=2, cblock=8, selected=4, lengths=(37, 6, 591)),
}


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_split_slots_equal_the_twin(case, num_splits):
    """Mean logits with each list's slots split over programs (a merge launch after): the twin's
    output and selection; rows whose last visible slot lies in an early split leave later splits
    empty."""
    p = step_problem(**SPLIT_CASES[case])
    out, indices, valid, probs = run_kernel(p, num_splits=num_splits)
    want_out, want = run_twin(p)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    check_selection(indices, valid, probs, want, exact_block_probs(p), p["rule"].forced_initial + p["rule"].forced_local)
    whole = run_kernel(p, num_splits=1)
    torch.testing.assert_close(out, whole[0], atol=2e-6, rtol=2e-6)
    assert torch.equal(indices, whole[1]) and torch.equal(valid, whole[2])


@pytest.mark.usefixtures("poisoned_outputs")
def test_split_slots_half_precision():
    p = step_problem(**SPLIT_CASES["forced_tokens2_mem2"], dtype=HALF)
    out, indices, valid, probs = run_kernel(p, num_splits=3)
    want_out, want = run_twin(p)
    exact_out, _ = run_twin(p, torch.float64)
    assert out.dtype == HALF and probs.dtype == HALF
    twin_err = (want_out.double() - exact_out).abs().max().item()
    assert (out.double() - exact_out).abs().max().item() <= 2 * twin_err + 1e-6
    check_selection(indices, valid, probs, want, exact_block_probs(p), 3)


def test_summed_probs_ignore_splits():
    """Summed probabilities need every head's final max and sum: one program per list whatever is asked."""
    p = step_problem(**SPLIT_CASES["pooled"], importance="summed_probs")
    for a, b in zip(run_kernel(p, num_splits=3), run_kernel(p, num_splits=1)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_num_splits_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_splits"):
        run_kernel(step_problem(), num_splits=bad)


def test_split_never_reads_invisible_slots():
    p = step_problem(**SPLIT_CASES["pooled"])
    clean = run_kernel(p, num_splits=3)
    poison_invisible_slots(p)
    for a, b in zip(clean, run_kernel(p, num_splits=3)):
        assert torch.equal(a, b)


def test_kernel_never_reads_invisible_slots():
    """Slots after each query's last visible one hold NaN: the outputs do not change."""
    p = step_problem(**CASES["summed"])
    clean = run_kernel(p)
    poison_invisible_slots(p)
    for a, b in zip(clean, run_kernel(p)):
        assert torch.equal(a, b)


def test_rows_without_compressed_blocks():
    """Queries before the first compressed block: the memory tokens' output, every slot invalid."""
    p = step_problem(lengths=(0, 2, 3), K=1, stride=4, sel=8)
    out, indices, valid, probs = run_kernel(p)
    want_out, want = run_twin(p)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    assert not valid.any() and torch.equal(indices, want.indices)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("importance, forced", [("mean_logits", (0, 0)), ("summed_probs", (1, 2))])
def test_kernel_gpu_paper_layer(importance, forced):
    """The paper's layer at 64k: 64 query / 4 kv heads of 128, compression 32 / stride 16, selection
    blocks of 64, 16 selected; bf16; ragged rows."""
    capacity = 65536
    p = step_problem(lengths=(65535 - 3, 40001, 777), HKV=4, G=16, K=1, D=128, M=1, stride=16, sel=64, cblock=32,
                     selected=16, capacity=capacity, cpage=64, importance=importance, forced=forced,
                     dtype=torch.bfloat16, device="cuda")
    out, indices, valid, probs = run_kernel(p)
    want_out, want = run_twin(p)
    exact_out, _ = run_twin(p, torch.float64)
    twin_err = (want_out.double() - exact_out).abs().max().item()
    assert (out.double() - exact_out).abs().max().item() <= 2 * twin_err + 1e-6
    check_selection(indices, valid, probs, want, exact_block_probs(p), sum(forced))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_gpu_cuda_graph_replays_new_positions():
    """Captured once, a replay with other positions gives the eager kernel's result."""
    p = step_problem(lengths=(30000, 1234), HKV=4, G=16, D=128, stride=16, sel=64, cblock=32, selected=16,
                     capacity=32768, cpage=64, dtype=torch.bfloat16, device="cuda")
    run_kernel(p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_kernel(p)
    p["positions"].copy_(torch.tensor([[20001], [77]], device="cuda"))
    graph.replay()
    for a, b in zip(captured, run_kernel(p)):
        assert torch.equal(a, b)
    assert math.isfinite(captured[0].float().sum().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_splits", [None, 1])
def test_sorted_top_k_gpu_paper_layer(monkeypatch, num_splits):
    """The paper's layer at 64k with 1 + 2 forced blocks, bf16, ragged rows: the sorted top-k (the GPU's Triton,
    tl.topk on int64 keys) makes the slot loop's choices bit for bit, split (None: the launcher's) and whole."""
    from nsa_core.kernels.decode import compressed_selection

    p = step_problem(lengths=(65535 - 3, 40001, 777), HKV=4, G=16, K=1, D=128, M=1, stride=16, sel=64, cblock=32,
                     selected=16, capacity=65536, cpage=64, forced=(1, 2), dtype=torch.bfloat16, device="cuda")
    loop = run_kernel(p, num_splits=num_splits)
    monkeypatch.setattr(compressed_selection, "SORTED_TOP_K", True)
    sorted_top = run_kernel(p, num_splits=num_splits)
    for name, a, b in zip(("out", "indices", "valid", "probs"), sorted_top, loop):
        assert torch.equal(a, b), name
