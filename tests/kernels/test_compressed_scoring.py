"""The fused compressed-branch kernel (kernels/compressed_scoring.py) against the PyTorch path: the
compressed attention's output and log-sum-exp, the selection blocks' scores for both importance
scores, the top-k through ops.compressed_selection, and the gradients (the staircase SDPA's backward).

Tolerances come from the PyTorch path's own error at the dtype: the kernel's error against a float64
reference may be at most twice that of the same math in PyTorch at the inputs' dtype (plus a float32
floor). Outputs start as NaN (poisoned_outputs): an element the kernel does not write fails."""

import importlib

import pytest
import torch

from nsa_core.ops import compressed_attention, select_blocks
from nsa_core.ops.compressed_selection import compressed_selection
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.reference.compressed_attention import compressed_attention_reference, compressed_scores
from nsa_core.reference.pooled_selection import pooled_block_scores
from nsa_core.reference.selection import block_importance, select_blocks_reference
from nsa_core.selection import SelectionRule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(kernel_unavailable_reason(torch.device(DEVICE)) is not None,
                       reason="kernels cannot run here (no CUDA and no TRITON_INTERPRET)"),
    pytest.mark.usefixtures("poisoned_outputs"),
]
CMP = [(8, 4, 16), (16, 8, 16), (16, 8, 32)]  # compress block, stride, selection block


@pytest.fixture(autouse=True)
def fused_for_both_scores(monkeypatch):
    """The op fuses only the scores it measured faster (FUSED_TRAINING_SCORES); these tests run the
    kernel for both."""
    op = importlib.import_module("nsa_core.ops.compressed_selection")
    monkeypatch.setattr(op, "FUSED_TRAINING_SCORES", frozenset({"mean_logits", "summed_probs"}))


def branch(q, ck, cv, rule, *, stride, **kwargs):
    """The op with the selection scoring ck's keys after the memory tokens (selection_keys=None), which
    whole sequences on the kernels take through the fused kernel."""
    assert stride == rule.stride
    return compressed_selection(q, ck, cv, None, rule, **kwargs)


def inputs(B, HKV, G, T, D, M, stride, dtype, seed=0, q_offset=0, std=1.0):
    gen = torch.Generator().manual_seed(seed)
    C = (q_offset + T) // stride
    q = torch.randn(B, HKV * G, T, D, generator=gen, dtype=torch.float64) * std
    ck = torch.randn(B, HKV, M + C, D, generator=gen, dtype=torch.float64)
    cv = torch.randn(B, HKV, M + C, D, generator=gen, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE) for t in (q, ck, cv)]


def rule_for(G, stride, sel, L, importance, *, k=3, share=True, causal=True, scale=0.3, forced=(0, 0)):
    return SelectionRule(num_selected=k, selection_block_size=sel, stride=stride, group_size=G, share_across_group=share,
                         interpolated=False, use_diff_topk=False, causal=causal, scale=scale, importance=importance,
                         compress_block=L, forced_initial=forced[0], forced_local=forced[1])


def twin_scores(q, ck, M, rule, q_offset=0):
    """The PyTorch path's scores (-inf where the query may not select the block), at q's dtype."""
    pos = torch.arange(q_offset, q_offset + q.shape[-2], device=q.device)
    keys = ck[:, :, M:]
    if rule.importance == "summed_probs":
        scores = compressed_scores(q, keys, rule.stride, rule.causal, rule.scale, pos)
        return block_importance(scores, group_size=rule.group_size, share_across_group=rule.share_across_group,
                                stride=rule.stride, selection_block_size=rule.selection_block_size, interpolated=False,
                                causal=rule.causal, query_pos=pos, importance="summed_probs",
                                compress_block=rule.compress_block)
    scores = pooled_block_scores(q, keys, group_size=rule.group_size, share_across_group=rule.share_across_group,
                                 stride=rule.stride, selection_block_size=rule.selection_block_size)
    blocks = torch.arange(scores.shape[-1], device=q.device)
    keep = torch.ones(q.shape[-2], scores.shape[-1], dtype=torch.bool, device=q.device)
    if rule.causal:
        keep &= (blocks + 1) * rule.selection_block_size <= pos[:, None]
    if rule.selection_block_size != rule.stride:
        keep &= blocks != pos[:, None] // rule.selection_block_size
    return scores.masked_fill(~keep, float("-inf"))


def fused(q, ck, cv, M, rule, q_offset=0):
    from nsa_core.kernels.compressed_scoring_launch import compressed_scoring

    return compressed_scoring(q, ck, cv, num_memory=M, stride=rule.stride, selection_block_size=rule.selection_block_size,
                              compress_block=rule.compress_block, causal=rule.causal, scale=rule.scale,
                              q_offset=q_offset, summed=rule.importance == "summed_probs", share=rule.share_across_group,
                              mask_own=rule.selection_block_size != rule.stride)


def err(a, b, where=None):
    d = (a.double() - b.double()).abs()
    return (d if where is None else d[where]).max().item() if d.numel() else 0.0


def check_within(got, low, exact, dtype, where=None):
    """got and low (the PyTorch path at dtype) against exact (float64): got's error <= 2x low's + floor."""
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert err(got, exact, where) <= 2 * err(low, exact, where) + floor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("importance", ["mean_logits", "summed_probs"])
@pytest.mark.parametrize("L, stride, sel", CMP)
@pytest.mark.parametrize("causal, M, T, q_offset", [(True, 1, 77, 0), (True, 2, 45, 13), (False, 1, 51, 0)])
def test_fused_equals_pytorch_path(dtype, importance, L, stride, sel, causal, M, T, q_offset):
    """G = 3 query heads per kv head, odd lengths, queries after other keys: output, LSE and scores."""
    B, HKV, G, D = 2, 2, 3, 32
    rule = rule_for(G, stride, sel, L, importance, causal=causal)
    q, ck, cv = inputs(B, HKV, G, T, D, M, stride, dtype, seed=T + sel, q_offset=q_offset)
    out, lse, scores = fused(q, ck, cv, M, rule, q_offset)
    exact = [t.double() for t in (q, ck, cv)]
    want_out, _ = compressed_attention_reference(*exact, M, stride, causal, rule.scale, query_offset=q_offset)
    low_out, _ = compressed_attention_reference(q, ck, cv, M, stride, causal, rule.scale, query_offset=q_offset)
    assert out.dtype == dtype and lse.dtype == torch.float32 and scores.dtype == dtype
    assert not any(t.isnan().any() for t in (out, lse, scores))  # every element written (-inf is a value)
    check_within(out, low_out, want_out, dtype)
    full = torch.matmul(exact[0].view(B, HKV, G, T, D), exact[1][:, :, None].transpose(-1, -2)) * rule.scale
    logits = full.reshape(B, HKV * G, T, -1)  # (B, HQ, T, M + C)
    if causal:
        pos = torch.arange(q_offset, q_offset + T, device=q.device)[:, None]
        visible = torch.cat((torch.ones(T, M, dtype=torch.bool, device=q.device),
                             (torch.arange(logits.shape[-1] - M, device=q.device) + 1) * stride <= pos), dim=-1)
        logits = logits.masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, dim=-1), rtol=0, atol=1e-4)
    want = twin_scores(*exact[:2], M, rule, q_offset)
    low = twin_scores(q, ck, M, rule, q_offset)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(scores), finite)  # -inf exactly where the query may not select
    check_within(scores, low, want, dtype, finite)


@pytest.mark.parametrize("importance", ["mean_logits", "summed_probs"])
@pytest.mark.parametrize("share", [True, False])
def test_fused_scores_per_head_and_padding(importance, share):
    """Per-head scores (no sharing), G = 3 padded to 4 rows and G = 5 to 8; M = 3 memory tokens."""
    for G in (3, 5):
        rule = rule_for(G, 8, 16, 16, importance, share=share)
        q, ck, cv = inputs(1, 1, G, 39, 16, 3, 8, torch.float32, seed=G)
        _, _, scores = fused(q, ck, cv, 3, rule)
        assert not scores.isnan().any()
        want = twin_scores(*(t.double() for t in (q, ck)), 3, rule)
        assert scores.shape == want.shape == (1, 1 if share else G, 39, 2)
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(scores), finite)
        assert err(scores, want, finite) < 1e-5


def clear_rows(probs, k, margin):
    """(..., T) bool: rows whose k best float64 probabilities and the next one differ pairwise by more than
    margin (relative) wherever the larger of two is a block that can be selected (> 1e-10; the rest are
    invalid slots)."""
    top = probs.topk(min(k + 1, probs.shape[-1]), dim=-1).values
    return ((top[..., :-1] <= 1e-10) | ((top[..., :-1] - top[..., 1:]) > margin * top[..., :-1])).all(dim=-1)


def assert_same_blocks(got, want, logits, rule, margin, min_rows):
    """got and want (Selections) choose the same blocks, in the same slots, in every row whose exact
    block logits (-inf where not selectable) are not near a tie; at least min_rows of the rows are such."""
    probs = torch.cat((torch.full_like(logits[..., :1], -1e3), logits), -1).softmax(-1)[..., 1:]
    k_free = min(rule.num_selected, probs.shape[-1]) - rule.forced_initial - rule.forced_local
    if rule.has_forced_blocks:
        pos = torch.arange(probs.shape[-2], device=probs.device)[:, None]
        own, blocks = pos // rule.selection_block_size, torch.arange(probs.shape[-1], device=probs.device)
        forced = ((blocks < rule.forced_initial) | (blocks >= own - rule.forced_local)) & (blocks < own)
        probs = probs.masked_fill(forced, 0.0)
    clear = clear_rows(probs, k_free, margin)[..., None]
    assert clear.float().mean() >= min_rows
    assert torch.equal(got.valid & clear, want.valid & clear)
    assert torch.equal(torch.where(got.valid & clear, got.indices, -1), torch.where(want.valid & clear, want.indices, -1))
    return got.valid & clear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("importance", ["mean_logits", "summed_probs"])
@pytest.mark.parametrize("L, stride, sel, forced", [(8, 4, 16, (0, 0)), (16, 8, 16, (1, 1)), (16, 8, 32, (0, 0))])
def test_compressed_branch_selects_what_the_reference_selects(dtype, importance, L, stride, sel, forced):
    """Through the op (backend="triton"): the same blocks as the float64 reference in every row whose
    scores are not near a tie, the probabilities within the dtype's rounding, the output as the op's."""
    G, T, M, k = 3, 150, 1, 4
    rule = rule_for(G, stride, sel, L, importance, k=k, forced=forced, scale=0.5)
    q, ck, cv = inputs(1, 2, G, T, 16, M, stride, dtype, seed=sel + L)
    out, got = branch(q, ck, cv, rule, num_memory=M, stride=stride, causal=True, scale=0.5,
                                 backend="triton")
    exact = [t.double() for t in (q, ck, cv)]
    want = select_blocks_reference(exact[0], exact[1][:, :, M:], rule)
    assert got.indices.shape == want.indices.shape and got.gates is None
    logits = twin_scores(exact[0], exact[1], M, rule) * (rule.scale if importance == "mean_logits" else 1.0)
    margin = 1e-4 if dtype == torch.float32 else 3e-2  # the scores' rounding to the dtype, and more
    compared = assert_same_blocks(got, want, logits, rule, margin, min_rows=0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert err(got.probs, want.probs, compared) < tol
    two_op = compressed_attention(q, ck, cv, num_memory=M, stride=stride, causal=True, scale=0.5, backend="triton")
    torch.testing.assert_close(out.float(), two_op.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("importance", ["mean_logits", "summed_probs"])
@pytest.mark.parametrize("q_offset", [0, 13])
def test_gradients_are_the_two_op_path(importance, q_offset):
    """The fused path's output carries the staircase SDPA's gradients: equal to the two-op kernel path's
    (the same backward on the same inputs), and to the float64 reference's within float32 rounding."""
    from nsa_core.seqs import Seqs

    G, T, M, stride = 3, 61, 2, 8
    rule = rule_for(G, stride, 16, 16, importance, scale=0.4)
    q, ck, cv = inputs(2, 2, G, T, 16, M, stride, torch.float32, seed=q_offset, q_offset=q_offset)
    seqs = Seqs(T, q_offset + T, q_offset)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32).to(DEVICE)

    def grads(run, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = run(*leaves)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, g.to(out.dtype)))

    fused_grads = grads(lambda *t: branch(*t, rule, num_memory=M, stride=stride, scale=0.4, seqs=seqs,
                                                     backend="triton")[0], (q, ck, cv))
    two_op = grads(lambda *t: compressed_attention(*t, num_memory=M, stride=stride, scale=0.4, seqs=seqs,
                                                   backend="triton"), (q, ck, cv))
    exact = grads(lambda *t: compressed_attention_reference(*t, M, stride, True, 0.4, query_offset=q_offset)[0],
                  [t.double() for t in (q, ck, cv)])
    for got, same, want in zip(fused_grads, two_op, exact):
        torch.testing.assert_close(got, same, rtol=0, atol=0 if got is not fused_grads[0] else 2e-6)
        assert err(got, want) < 1e-5 * max(1.0, want.abs().max().item())


def test_fused_path_taken_and_left(monkeypatch):
    """The op takes the fused kernel for plain rows on the kernels, and the two ops (identical results)
    for packed documents, use_diff_topk and selection blocks that are not a multiple of the stride."""
    from nsa_core.kernels import compressed_scoring_launch
    from nsa_core.seqs import Seqs

    calls = []
    kernel = compressed_scoring_launch.compressed_scoring
    monkeypatch.setattr(compressed_scoring_launch, "compressed_scoring", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    q, ck, cv = inputs(1, 1, 3, 48, 16, 1, 8, torch.float32)
    plain = rule_for(3, 8, 16, 16, "mean_logits")
    branch(q, ck, cv, plain, num_memory=1, stride=8, scale=0.3, backend="triton")
    assert calls == [1]
    packed = Seqs.packed(torch.tensor([0, 16, 48]), 48)
    for rule, seqs in ((plain, packed), (rule_for(3, 8, 4, 16, "summed_probs"), None),
                       (SelectionRule(3, 16, 8, 3, True, False, True, True, 0.3, compress_block=16), None)):
        out, sel = branch(q, ck, cv, rule, num_memory=1, stride=8, scale=0.3, seqs=seqs, backend="triton")
        want_sel = select_blocks(q, ck[:, :, 1:], rule, seqs=seqs, backend="triton")
        torch.testing.assert_close(out, compressed_attention(q, ck, cv, num_memory=1, stride=8, scale=0.3, seqs=seqs,
                                                             backend="triton"), rtol=0, atol=0)
        assert torch.equal(sel.indices, want_sel.indices)
    assert calls == [1]


@pytest.mark.parametrize("share", [True, False])
def test_query_chunks_join(monkeypatch, share):
    """Chunks of queries (a small score budget: chunks of 7 queries, q_offset advancing) give what one
    call gives: output, gradients and the selection, per head (share=False) too."""
    compressed_selection = importlib.import_module("nsa_core.ops.compressed_selection")  # the module

    rule = rule_for(3, 8, 16, 16, "mean_logits", share=share, forced=(1, 1))
    q, ck, cv = inputs(1, 2, 3, 45, 16, 1, 8, torch.float32, seed=5)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, ck, cv)]
        out, sel = branch(*leaves, rule, num_memory=1, stride=8, scale=0.3, backend="triton")
        return [out, sel.indices, sel.valid, sel.probs, *torch.autograd.grad(out.sum(), leaves)]

    whole = run()
    heads = 2 if share else 6
    monkeypatch.setattr(compressed_selection, "SCORE_BUDGET", 7 * heads * 2)  # NB = 2 blocks
    for a, b in zip(run(), whole):  # dK / dV: the chunks' backwards sum in another order
        torch.testing.assert_close(a, b)


def test_opcheck_and_compile():
    """The custom op's schema, fake and autograd registration; the op under torch.compile(fullgraph=True)
    gives the eager output and gradients."""
    from nsa_core.kernels.compressed_scoring_launch import _fwd

    q, ck, cv = inputs(1, 2, 3, 29, 16, 1, 8, torch.float32, seed=3)
    args = (q.requires_grad_(), ck.requires_grad_(), cv.requires_grad_(), 1, 8, 16, 16, True, 0.3, 0, True, True,
            True)
    torch.library.opcheck(_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    rule = rule_for(3, 8, 16, 16, "summed_probs")

    def f(q, ck, cv):
        out, sel = branch(q, ck, cv, rule, num_memory=1, stride=8, scale=0.3, backend="triton")
        return out.sum() + sel.probs.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, ck, cv), f(q, ck, cv)
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.autograd.grad(got, (q, ck, cv)), torch.autograd.grad(want, (q, ck, cv)))


def test_module_on_the_fused_path(monkeypatch):
    """SparseAttention on the kernels (backend="triton": the fused compressed branch, which it runs) against
    the PyTorch module, both importance scores, forced blocks: output and gradients in float32."""
    from helpers import output_and_grads, reference_and_kernel_modules, rel_err
    from nsa_core.kernels import compressed_scoring_launch

    calls = []
    kernel = compressed_scoring_launch.compressed_scoring
    monkeypatch.setattr(compressed_scoring_launch, "compressed_scoring", lambda *a, **k: calls.append(1) or kernel(*a, **k))

    for importance in ("mean_logits", "summed_probs"):
        kwargs = dict(dim=32, dim_head=16, heads=6, kv_heads=2, sliding_window_size=8, compress_block_size=16,
                      compress_block_sliding_stride=8, selection_block_size=16, num_selected_blocks=3, causal=True,
                      num_forced_initial_blocks=1, importance_score=importance)
        reference, module = reference_and_kernel_modules(0.3, DEVICE, **kwargs)
        x = torch.randn(1, 41, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        want_out, want = output_and_grads(reference, x)
        got_out, got = output_and_grads(module, x)
        assert rel_err(got_out, want_out) < 1e-4
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-3
    assert len(calls) >= 2


# GPU, the paper's shape -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("importance", ["mean_logits", "summed_probs"])
def test_paper_shape_gpu(importance):
    """64 query / 4 kv heads of 128, compression 32 / 16, selection 64, 16 selected (1 initial + 2 local
    forced), 8k tokens, bf16: the fused op against the two ops of today (scores, blocks where not tied,
    output, gradients)."""
    T, M, stride, sel, k = 8192, 1, 16, 64, 16
    rule = rule_for(16, stride, sel, 32, importance, k=k, scale=128 ** -0.5, forced=(1, 2))
    q, ck, cv = inputs(1, 4, 16, T, 128, M, stride, torch.bfloat16, std=4.0)  # peaked block scores: fewer ties
    _, _, scores = fused(q, ck, cv, M, rule)
    want = twin_scores(*(t.float() for t in (q, ck)), M, rule)
    low = twin_scores(q, ck, M, rule)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(scores), finite)
    check_within(scores, low, want, torch.bfloat16, finite)
    leaves = [t.clone().requires_grad_() for t in (q, ck, cv)]
    out, got = branch(*leaves, rule, num_memory=M, stride=stride, scale=rule.scale, backend="triton")
    g = torch.randn_like(out)
    fused_grads = torch.autograd.grad(out, leaves, g)
    leaves2 = [t.clone().requires_grad_() for t in (q, ck, cv)]
    two = compressed_attention(*leaves2, num_memory=M, stride=stride, scale=rule.scale, backend="triton")
    two_grads = torch.autograd.grad(two, leaves2, g)
    assert err(out, two) < 2e-2
    for a, b in zip(fused_grads, two_grads):  # the same backward (its dQ may accumulate in another order)
        assert err(a, b) <= 1e-2 * b.abs().max().item()
    exact = select_blocks(q.float(), ck[:, :, M:].float(), rule, backend="torch")
    logits = want * (rule.scale if importance == "mean_logits" else 1.0)
    assert_same_blocks(got, exact, logits, rule, margin=3e-2, min_rows=0.01)


def test_the_op_fuses_the_scores_it_measured_faster(monkeypatch):
    """Whole sequences take the fused kernel for the scores in FUSED_TRAINING_SCORES (summed
    probabilities; mean logits stay on the two ops, which measured faster), never packed rows."""
    from nsa_core.seqs import Seqs

    op = importlib.import_module("nsa_core.ops.compressed_selection")
    monkeypatch.setattr(op, "FUSED_TRAINING_SCORES", frozenset({"summed_probs"}))
    q = torch.zeros(1, 6, 8, 16)
    summed, mean = rule_for(3, 8, 16, 16, "summed_probs"), rule_for(3, 8, 16, 16, "mean_logits")
    assert op._training_by_design(q, summed, True, 0.3, None) is None
    assert "two ops" in op._training_by_design(q, mean, True, 0.3, None)
    packed = Seqs.packed(torch.tensor([0, 3, 8]), 8)
    assert "packed" in op._training_by_design(q, summed, True, 0.3, packed)
