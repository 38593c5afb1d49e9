"""Random inputs for the selected-attention kernel tests."""

from __future__ import annotations

import math

import torch

from nsa_core.ops.seqs import Seqs


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
