"""Packed documents on FlexAttention (kernels/flex_intervals.py): the compressed branch and the dense
document attention in one call, against the PyTorch twin (each document alone).

FlexAttention runs on CPU eagerly and forward only (PyTorch has no CPU backward for it), and the eager
path ignores the block mask. So on CPU: the forward equals the twin (float64), the block mask covers
every visible key and marks full only all-visible tiles (checked against the dense mask of small rows),
the mask_mod under a plain masked SDPA gives the twin's gradients, and one slow test runs the compiled
CPU kernel (which does use the block mask). On the GPU: the compiled kernel, forward and backward."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

from nsa_core.kernels.compressed_flex import compressed_attention_flex, compressed_intervals
from nsa_core.kernels.document_flex import document_attention_flex, document_intervals
from nsa_core.kernels.flex_intervals import TILE, interval_block_mask, interval_mask_mod
from nsa_core.ops import Seqs, compressed_attention, document_attention
from nsa_core.ops.dispatch import kernel_unavailable_reason
from nsa_core.reference.compressed_attention import compressed_attention_chunked
from nsa_core.reference.documents import compressed_span, per_document

LENGTHS = [9, 1, 0, 70, 3, 40, 0, 2]  # 1, shorter than a stride, empty documents, none a multiple of 4
LONG = [300, 1, 0, 5, 129, 0, 257, 3, 40]  # several tiles of 128, documents crossing tiles
kernels_here = pytest.mark.skipif(kernel_unavailable_reason(torch.device("cpu")) is not None,
                                  reason="needs TRITON_INTERPRET=1 for backend='triton' on CPU")


def cumulative(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def inputs(lengths, HQ, HKV, M, stride, dtype=torch.float64, D=16, Dv=16, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    shapes = ((HQ, T, D), (HKV, M + T // stride, D), (HKV, M + T // stride, Dv))
    return [torch.randn(1, *s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]


def compressed_twin(q, ck, cv, cu, M, stride, causal, scale):
    def document(s, e):
        first, last = compressed_span(s, e, stride)
        keys, values = (torch.cat((t[:, :, :M], t[:, :, M + first : M + last]), dim=-2) for t in (ck, cv))
        return compressed_attention_chunked(q[:, :, s:e], keys, values, M, stride, causal, scale)

    return per_document(document, list(zip(cu[:-1].tolist(), cu[1:].tolist())))


def grads_of(fn, tensors, seed=1):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device))
    return [out.detach()] + [t.grad for t in leaves]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("G, M, stride", [(1, 1, 4), (3, 1, 4), (3, 3, 3), (1, 2, 16)])
@pytest.mark.parametrize("lengths", [LENGTHS, [5], [0, 3, 0]])
def test_compressed_flex_forward_equals_twin(causal, G, M, stride, lengths):
    q, ck, cv = inputs(lengths, 2 * G, 2, M, stride, Dv=12, seed=G + M)
    cu = cumulative(lengths)
    got = compressed_attention_flex(q, ck, cv, cu, M, stride, causal, 0.3)
    assert got.shape == (1, 2 * G, sum(lengths), 12)
    assert rel(got, compressed_twin(q, ck, cv, cu, M, stride, causal, 0.3)) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("G, M, stride", [(1, 1, 4), (3, 2, 3)])
def test_compressed_mask_mod_gradients_equal_twin(causal, G, M, stride):
    """The mask_mod (what the GPU kernel's backward masks with) as a dense mask under SDPA: gradients of
    q, ck, cv equal the twin's."""
    q, ck, cv = inputs(LENGTHS, 2 * G, 2, M, stride, seed=G)
    cu, T, C = cumulative(LENGTHS), q.shape[-2], ck.shape[-2]
    lo, hi = compressed_intervals(cu, T, M, stride, causal)
    mask = create_mask(interval_mask_mod(lo, hi, M), None, None, T, C, device="cpu")

    def masked(q, ck, cv):
        return F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask, scale=0.3, enable_gqa=True)

    got = grads_of(masked, [q, ck, cv])
    want = grads_of(lambda q, ck, cv: compressed_twin(q, ck, cv, cu, M, stride, causal, 0.3), [q, ck, cv])
    for name, a, b in zip(("out", "dq", "dck", "dcv"), got, want):
        assert rel(a, b) < 1e-12, name


def dense_flex(q, k, v, block_mask, scale):
    """FlexAttention's semantics with the block mask's mask_mod as a dense mask under SDPA (CPU, with a
    backward): what the GPU kernel computes, forward and backward."""
    mask = create_mask(block_mask.mask_mod, None, q.shape[1], q.shape[-2], k.shape[-2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("G, M, stride", [(1, 1, 4), (3, 2, 3), (2, 1, 16)])
def test_compressed_row_layout_gradients_equal_twin(causal, G, M, stride, monkeypatch):
    """The row layout (stride tokens per row in the heads, keys repeated) with its mask_mod: output and
    gradients of q, ck, cv equal the twin's (documents of 1 token, empty ones, none a stride multiple)."""
    from nsa_core.kernels import flex_intervals

    monkeypatch.setattr(flex_intervals, "flex", dense_flex)
    q, ck, cv = inputs(LENGTHS, 2 * G, 2, M, stride, Dv=12, seed=G + stride)
    cu = cumulative(LENGTHS)
    got = grads_of(lambda q, ck, cv: compressed_attention_flex(q, ck, cv, cu, M, stride, causal, 0.3), [q, ck, cv])
    want = grads_of(lambda q, ck, cv: compressed_twin(q, ck, cv, cu, M, stride, causal, 0.3), [q, ck, cv])
    for name, a, b in zip(("out", "dq", "dck", "dcv"), got, want):
        assert rel(a, b) < 1e-12, name


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [LONG, [1000], [128 * 16 + 3, 5]])
def test_row_layout_block_masks_cover_the_mask(causal, lengths):
    """Row layout: every key a row's tokens see lies in a listed tile, full tiles are all-visible."""
    cu, T, HQ = cumulative(lengths), sum(lengths), 3
    for stride, M in ((4, 1), (16, 1), (3, 130)):
        lo, hi = compressed_intervals(cu, T, M, stride, causal)
        kv_len = M + T // stride
        block_mask = interval_block_mask(lo, hi, M, kv_len, tokens_per_row=stride, heads=HQ)
        rows = -(-T // stride)
        dense = create_mask(block_mask.mask_mod, None, stride * HQ, rows, kv_len, device="cpu")[0].any(0)
        nq, nk = -(-rows // TILE), -(-kv_len // TILE)
        padded = F.pad(dense, (0, nk * TILE - kv_len, 0, nq * TILE - rows)).view(nq, TILE, nk, TILE)
        needed = padded.any(3).any(1)
        every = create_mask(block_mask.mask_mod, None, stride * HQ, rows, kv_len, device="cpu")[0].all(0)
        all_seen = F.pad(every, (0, nk * TILE - kv_len, 0, nq * TILE - rows)).view(nq, TILE, nk, TILE).all(3).all(1)
        partial = _tiles(block_mask.kv_num_blocks, block_mask.kv_indices, nk)
        full = _tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nk)
        assert not (partial & full).any()
        assert not (needed & ~(partial | full)).any()
        assert not (full & ~all_seen).any()
        if lengths == [1000] and causal and stride == 16:  # 63 rows: one tile, never full (rows missing)
            assert not full.any()


def check_block_mask(lo, hi, num_prefix, kv_len):
    """Every visible key lies in a listed tile; full tiles are complete and all-visible; none listed twice."""
    T = lo.shape[0]
    block_mask = interval_block_mask(lo, hi, num_prefix, kv_len)
    dense = create_mask(interval_mask_mod(lo, hi, num_prefix), None, None, T, kv_len, device="cpu")[0, 0]
    nq, nk = -(-T // TILE), -(-kv_len // TILE)
    padded = F.pad(dense, (0, nk * TILE - kv_len, 0, nq * TILE - T)).view(nq, TILE, nk, TILE)
    needed, all_seen = padded.any(3).any(1), padded.all(3).all(1)
    partial = _tiles(block_mask.kv_num_blocks, block_mask.kv_indices, nk)
    full = _tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nk)
    assert not (partial & full).any()
    assert not (needed & ~(partial | full)).any()
    assert not (full & ~all_seen).any()
    return needed, partial, full


def _tiles(counts, indices, nk):
    """(1, 1, NQ) counts and (1, 1, NQ, NK) indices -> (NQ, NK) bool: the listed tiles."""
    counts, indices = counts[0, 0], indices[0, 0].long()
    listed = torch.arange(indices.shape[-1])[None, :] < counts[:, None]
    tiles = torch.zeros(counts.shape[0], nk + 1, dtype=torch.bool)  # unlisted entries go to the extra column
    return tiles.scatter_(1, torch.where(listed, indices, nk), True)[:, :nk]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [LENGTHS, LONG, [128, 128], [1000]])
def test_block_masks_cover_the_mask(causal, lengths):
    cu, T = cumulative(lengths), sum(lengths)
    for stride, M in ((1, 1), (2, 130), (4, 3)):  # stride 1 and 130 memory tokens: tiles of slots and of memory
        lo, hi = compressed_intervals(cu, T, M, stride, causal)
        check_block_mask(lo, hi, M, M + T // stride)
    lo, hi = document_intervals(cu, T, causal)
    needed, partial, full = check_block_mask(lo, hi, 0, T)
    if lengths == [1000] and causal:  # one causal document: the diagonal tiles partial, those below full,
        below = torch.ones(8, 8, dtype=torch.bool).tril(-1)  # but the last row (104 queries) is never full
        assert torch.equal(full, below & (torch.arange(8) < 7)[:, None])
        assert torch.equal(partial, torch.eye(8, dtype=torch.bool) | (below & (torch.arange(8) == 7)[:, None]))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("G", [1, 3])
def test_document_flex_forward_and_mask_gradients_equal_twin(causal, G):
    gen = torch.Generator().manual_seed(G)
    cu, T = cumulative(LENGTHS), sum(LENGTHS)
    q, k, v = (torch.randn(1, h, T, 16, generator=gen, dtype=torch.float64) for h in (2 * G, 2, 2))
    seqs = Seqs.packed(cu, T)
    twin = lambda q, k, v: document_attention(q, k, v, causal=causal, seqs=seqs, backend="torch")
    assert rel(document_attention_flex(q, k, v, cu, causal, 16 ** -0.5), twin(q, k, v)) < 1e-12
    lo, hi = document_intervals(cu, T, causal)
    mask = create_mask(interval_mask_mod(lo, hi, 0), None, None, T, T, device="cpu")
    masked = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G > 1)
    for name, a, b in zip(("out", "dq", "dk", "dv"), grads_of(masked, [q, k, v]), grads_of(twin, [q, k, v])):
        assert rel(a, b) < 1e-12, name


@kernels_here
@pytest.mark.parametrize("causal", [True, False])
def test_ops_take_flex_for_packed_documents(causal, monkeypatch):
    """backend='triton' on CPU: the ops run FlexAttention (forward; float32) and refuse gradients."""
    import nsa_core.kernels.flex_intervals as flex_intervals

    calls = []
    real = flex_intervals.flex
    monkeypatch.setattr(flex_intervals, "flex", lambda *a: calls.append(1) or real(*a))
    cu, T = cumulative(LENGTHS), sum(LENGTHS)
    seqs = Seqs.packed(cu, T)
    q, ck, cv = inputs(LENGTHS, 6, 2, 2, 4, dtype=torch.float32)
    args = dict(num_memory=2, stride=4, causal=causal, seqs=seqs)
    got = compressed_attention(q, ck, cv, backend="triton", **args)
    assert rel(got, compressed_attention(q, ck, cv, backend="torch", **args)) < 1e-5
    k, v = q[:, :2].clone(), q[:, 2:4].clone()
    got = document_attention(q, k, v, causal=causal, seqs=seqs, backend="triton")
    assert rel(got, document_attention(q, k, v, causal=causal, seqs=seqs, backend="torch")) < 1e-5
    assert len(calls) == 2
    with pytest.raises(ValueError, match="compressed_attention.*no backward on CPU"):
        compressed_attention(q.requires_grad_(), ck, cv, backend="triton", **args)
    with pytest.raises(ValueError, match="document_attention.*float16, bfloat16 or float32"):
        document_attention(q.double(), k.double(), v.double(), seqs=seqs, backend="triton")


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_cpu_kernel_uses_the_block_mask():
    """torch.compile'd FlexAttention on CPU skips the tiles the block mask leaves out: equal to the twin."""
    from nsa_core.kernels import flex_intervals

    cu, M, stride = cumulative(LONG), 2, 2
    q, ck, cv = inputs(LONG, 4, 2, M, stride, dtype=torch.float32)
    lo, hi = compressed_intervals(cu, q.shape[-2], M, stride, causal=True)
    block_mask = interval_block_mask(lo, hi, M, ck.shape[-2])
    got = flex_intervals._compiled_flex()(q, ck, cv, block_mask=block_mask, scale=0.3, enable_gqa=True)
    assert rel(got, compressed_twin(q, ck, cv, cu, M, stride, True, 0.3)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("branch", ["compressed", "document"])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_gpu_forward_backward(branch, causal):
    """The compiled kernels, fp32 against the twin to 1e-4; bf16 within 3x the twin's own bf16 error."""
    lengths = [1000, 1, 0, 3000, 77, 2048, 5]
    cu, T = cumulative(lengths, "cuda"), sum(lengths)
    seqs = Seqs.packed(cu, T, device="cuda")
    if branch == "compressed":
        q, ck, cv = inputs(lengths, 64, 4, 1, 16, dtype=torch.float32, D=128, Dv=128, device="cuda")
        op = lambda q, k, v, backend: compressed_attention(q, k, v, num_memory=1, stride=16, causal=causal, seqs=seqs,
                                                           backend=backend)
    else:
        gen = torch.Generator().manual_seed(0)
        q, ck, cv = (torch.randn(1, h, T, 128, generator=gen).cuda() for h in (16, 4, 4))
        op = lambda q, k, v, backend: document_attention(q, k, v, causal=causal, seqs=seqs, backend=backend)
    exact = grads_of(lambda *t: op(*t, "torch"), [q, ck, cv])
    ours = grads_of(lambda *t: op(*t, "triton"), [q, ck, cv])
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, exact):
        assert rel(a, b) < 1e-4, name
    bf = [t.bfloat16() for t in (q, ck, cv)]
    ours = grads_of(lambda *t: op(*t, "triton"), bf)
    twin = grads_of(lambda *t: op(*t, "torch"), bf)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), ours, twin, exact):
        ours_err = ((a.float() - e).norm() / e.norm()).item()
        twin_err = ((b.float() - e).norm() / e.norm()).item()
        assert ours_err <= 3 * twin_err + 1e-6, (name, ours_err, twin_err)
