"""Random inputs for the selected-attention kernel tests, and their comparison with the reference."""

from __future__ import annotations

import math

import torch

from nsa_core import selected_attention
from nsa_core.seqs import Seqs


def random_problem(*, B=1, HKV=2, G=2, T=37, D=32, Dv=16, S=3, block=16, causal=True, per_head=False,
                   with_gates=False, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    HQ = G * HKV
    HI = HQ if per_head else HKV
    nb = math.ceil(T / block)
    q = torch.randn(B, HQ, T, D, generator=gen)
    k = torch.randn(B, HKV, T, D, generator=gen)
    v = torch.randn(B, HKV, T, Dv, generator=gen)
    scores = torch.rand(B, HI, T, nb, generator=gen)
    if causal:  # only blocks strictly before the own block can be real slots
        own = torch.arange(T)[:, None] // block
        scores = scores.masked_fill(torch.arange(nb)[None, :] >= own, -1.0)
    top = scores.topk(min(S, nb), dim=-1)
    idx = top.indices
    valid = (top.values >= 0) & (torch.rand(idx.shape, generator=gen) > 0.15)
    if idx.shape[-1] < S:
        pad = S - idx.shape[-1]
        idx = torch.cat((idx, torch.zeros(*idx.shape[:-1], pad, dtype=idx.dtype)), -1)
        valid = torch.cat((valid, torch.zeros(*valid.shape[:-1], pad, dtype=torch.bool)), -1)
    idx = torch.where(valid, idx, torch.randint(0, nb, idx.shape, generator=gen))  # junk in invalid slots
    gates = (torch.rand(idx.shape, generator=gen) + 0.5) if with_gates else None
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return dict(q=move(q), k=move(k), v=move(v), indices=idx.to(device), valid=valid.to(device), gates=move(gates),
                block_size=block, causal=causal)


def offset_problem(*, q_offset, q_len, T, window=None, **kwargs):
    """random_problem over T keys keeping only the queries q_offset ... q_offset + q_len - 1 and their
    selections, placed by problem["seqs"] (a sequence-parallel shard, or a decoding step)."""
    problem = random_problem(T=T, **kwargs)
    cut = lambda t: None if t is None else t[:, :, q_offset : q_offset + q_len]
    problem.update({name: cut(problem[name]) for name in ("q", "indices", "valid", "gates")})
    problem.update(seqs=Seqs(q_len, T, q_offset), window=window)
    return problem


def packed_seqs(lengths, device="cpu") -> Seqs:
    """Packed documents of these lengths (empty ones allowed), batch 1."""
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return Seqs.packed(cu, sum(lengths), device=device)


def packed_selection(seqs, HI, S, block, causal, seed, with_gates=False, device="cpu"):
    """Document-relative indices / valid / gates (1, HI, T, S): distinct blocks of each query's document
    (causal: before its own block), some slots invalid."""
    gen = torch.Generator().manual_seed(seed)
    T = seqs.q_len
    pos = seqs.query_positions("cpu")
    doc_len = torch.zeros(T, dtype=torch.long)
    for s, e in seqs.spans():
        doc_len[s:e] = e - s
    nb = max(1, -(-int(doc_len.max()) // block))
    scores = torch.rand(1, HI, T, nb, generator=gen)
    limit = (pos // block) if causal else -(-doc_len // block)
    scores = scores.masked_fill(torch.arange(nb)[None, :] >= limit[:, None], -1.0)
    top = scores.topk(min(S, nb), dim=-1)
    valid = (top.values >= 0) & (torch.rand(top.indices.shape, generator=gen) > 0.15)
    gates = (torch.rand(top.indices.shape, generator=gen) + 0.5) if with_gates else None
    move = lambda t: None if t is None else t.to(device)
    return move(top.indices), move(valid), move(gates)


def run(problem, backend, dtype=None, grad_seed=1):
    """Output and gradients (q, k, v, gates) of selected_attention on copies of the problem."""
    tensors = {}
    for name in ("q", "k", "v", "gates"):
        t = problem[name]
        if t is not None:
            t = t.detach().to(dtype or t.dtype).requires_grad_()
        tensors[name] = t
    out = selected_attention(tensors["q"], tensors["k"], tensors["v"], problem["indices"], block_size=problem["block_size"],
                             valid=problem["valid"], gates=tensors["gates"], causal=problem["causal"], backend=backend,
                             window=problem.get("window"), seqs=problem.get("seqs"))
    gen = torch.Generator(device=out.device).manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32).to(out.dtype)
    inputs = [t for t in tensors.values() if t is not None]
    grads = torch.autograd.grad(out, inputs, grad)
    return [out, *grads]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_against_reference(problem, dtype, factor):
    exact = run(problem, "torch", torch.float64)
    torch_same_dtype = run(problem, "torch", dtype)
    kernel = run(problem, "triton", dtype)
    for name, e, t, k in zip(("out", "dq", "dk", "dv", "dgates"), exact, torch_same_dtype, kernel):
        assert torch.isfinite(k).all(), f"{name} has NaN/inf (an element the kernel did not write?)"
        limit = factor * max_err(t, e) + 1e-6 * max(1.0, e.abs().max().item())
        assert max_err(k, e) <= limit, f"{name}: kernel error {max_err(k, e):.2e} > {limit:.2e}"
