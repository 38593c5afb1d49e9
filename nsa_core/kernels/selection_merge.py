"""Two selections of the same queries merged in one Triton launch: the slots of the first, then those of
the second, a slot of the second whose block a valid slot of the first holds marked invalid (each block
attended once). The PyTorch twin is nsa_core.selection.merge_selections (a comparison of every pair of
slots, an any, three concatenations).

Dimension legend: R rows (batch x heads x queries, flattened), S1 / S2 slots of the first / second.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 64


@triton.jit
def merge_selections_kernel(
    I1, V1, P1, I2, V2, P2, IO, VO, PO, ROWS,
    S1: tl.constexpr, S2: tl.constexpr, BLOCK_S1: tl.constexpr, BLOCK_S2: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    in_rows = rows < ROWS
    c1 = tl.arange(0, BLOCK_S1)
    c2 = tl.arange(0, BLOCK_S2)
    m1 = in_rows[:, None] & (c1 < S1)[None, :]
    m2 = in_rows[:, None] & (c2 < S2)[None, :]
    at1 = rows[:, None] * S1 + c1[None, :]
    at2 = rows[:, None] * S2 + c2[None, :]
    i1 = tl.load(I1 + at1, mask=m1, other=0)
    v1 = tl.load(V1 + at1, mask=m1, other=0) != 0
    p1 = tl.load(P1 + at1, mask=m1, other=0.0)
    i2 = tl.load(I2 + at2, mask=m2, other=0)
    v2 = tl.load(V2 + at2, mask=m2, other=0) != 0
    p2 = tl.load(P2 + at2, mask=m2, other=0.0)
    held = (i2[:, :, None] == i1[:, None, :]) & v1[:, None, :]  # (BLOCK_R, BLOCK_S2, BLOCK_S1)
    v2 = v2 & (tl.max(held.to(tl.int32), axis=2) == 0)
    out1 = rows[:, None] * (S1 + S2) + c1[None, :]
    out2 = rows[:, None] * (S1 + S2) + S1 + c2[None, :]
    tl.store(IO + out1, i1, mask=m1)
    tl.store(VO + out1, v1, mask=m1)
    tl.store(PO + out1, p1, mask=m1)
    tl.store(IO + out2, i2, mask=m2)
    tl.store(VO + out2, v2, mask=m2)
    tl.store(PO + out2, p2, mask=m2)


@torch.library.custom_op("nsa::merge_selections", mutates_args=())
def merge_selections_triton(i1: torch.Tensor, v1: torch.Tensor, p1: torch.Tensor, i2: torch.Tensor, v2: torch.Tensor,
                            p2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices / valid / probs (..., S1) and (..., S2) of the same leading shape (one index dtype, one
    probs dtype) -> the merged (..., S1 + S2) three."""
    lead, S1, S2 = i1.shape[:-1], i1.shape[-1], i2.shape[-1]
    rows = i1.numel() // max(S1, 1) if S1 else i2.numel() // max(S2, 1)
    shape = (*lead, S1 + S2)
    indices = torch.empty(shape, device=i1.device, dtype=i1.dtype)
    valid = torch.empty(shape, device=i1.device, dtype=torch.bool)
    probs = torch.empty(shape, device=i1.device, dtype=p1.dtype)
    if rows == 0 or S1 + S2 == 0:
        return indices, valid, probs
    i1, v1, p1, i2, v2, p2 = (t.contiguous() for t in (i1, v1, p1, i2, v2, p2))
    merge_selections_kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
        i1, v1, p1, i2, v2, p2, indices, valid, probs, rows,
        S1=S1, S2=S2, BLOCK_S1=max(2, triton.next_power_of_2(S1)), BLOCK_S2=max(2, triton.next_power_of_2(S2)),
        BLOCK_R=ROWS_PER_PROGRAM,
    )
    return indices, valid, probs


@merge_selections_triton.register_fake
def _merge_selections_fake(i1, v1, p1, i2, v2, p2):
    shape = (*i1.shape[:-1], i1.shape[-1] + i2.shape[-1])
    return i1.new_empty(shape), v1.new_empty(shape), p1.new_empty(shape)
