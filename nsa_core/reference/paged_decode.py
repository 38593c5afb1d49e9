"""Reference paged decode attention: the PyTorch twin of nsa_core.kernels.decode.

A few new query tokens per sequence attend lists of key blocks that live in a page pool. All three
NSA branches take this form at decode time: the selected blocks and the own block (keys up to the
query's position), the window's blocks (keys in [pos - window, pos]), and the compressed-key pool
(keys up to a per-query limit). Semantics, for query head h of list i = h // (HQ / HI), token k:
- logical page p of sequence b lives in physical page block_table[b, p];
- the keys seen are those of the list's slots s with valid[b, i, k, s] and a logical page
  blocks[b, i, k, s] in [0, max_pages) whose physical page lies in [0, P) (other slots are
  skipped, their ids never used), at logical indices j = page * page_size + offset with
  lo[b, k] <= j <= hi[b, k] (lo None: 0);
- softmax(scale * q . k) over those keys, times v; a query with no such key gets zeros.
Lists must not hold the same valid page twice (it would count twice).

Dimension legend: B batch, HQ query heads, HKV kv heads, HI lists (HKV: one per kv group, shared by
its G = HQ / HKV query heads; or HQ: one per query head), R = HQ / HI query heads per list,
K query tokens per sequence, S slots per list, P physical pages, PAGE keys per page, D / Dv head dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_core.reference.masked_softmax import masked_attention


def expand_lists(lists: str, blocks: Tensor | None, valid: Tensor | None, hi: Tensor, lo: Tensor | None, *,
                 window: int, page_size: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The lists a rule names, as explicit (blocks, valid, lo) (nsa_core.kernels.decode.op's `lists`):
    "listed" as given; "listed_and_own" the listed slots, then each query's own page hi // page_size;
    "window" the pages of keys hi - window ... hi, one list per kv head (lo = hi - window)."""
    if lists == "listed":
        return blocks, valid, lo
    if lists == "listed_and_own":
        B, HI, K, _ = blocks.shape
        own = (hi // page_size)[:, None, :, None].expand(B, HI, K, 1).to(blocks.dtype)
        return (torch.cat((blocks, own), dim=-1),
                torch.cat((valid, torch.ones_like(own, dtype=torch.bool)), dim=-1), lo)
    if lists != "window":
        raise ValueError(f"lists must be 'listed', 'listed_and_own' or 'window', got {lists!r}")
    B, K = hi.shape
    count = window // page_size + 2
    lo = hi - window
    first = lo.clamp(min=0) // page_size
    last = (hi // page_size)[:, None, :, None]
    pages = first[:, None, :, None] + torch.arange(count, device=hi.device)  # (B, 1, K, count)
    valid = (pages <= last).expand(B, kv_heads, K, count)
    return torch.minimum(pages, last).expand(B, kv_heads, K, count), valid, lo


def listed_keys(
    q: Tensor,  # (B, HQ, K, D)
    k_pages: Tensor,  # (P, HKV, PAGE, D)
    v_pages: Tensor,  # (P, HKV, PAGE, Dv)
    block_table: Tensor,  # (B, max_pages) integer
    blocks: Tensor,  # (B, HI, K, S) integer: logical pages, S > 0
    valid: Tensor,  # (B, HI, K, S) bool
    hi: Tensor,  # (B, K) integer: last visible logical key index
    lo: Tensor | None,  # (B, K) integer: first visible logical key index, None = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The listed pages of every query: (queries (B, HI, K, R, D), keys (B, HI, K, S * PAGE, D),
    values (B, HI, K, S * PAGE, Dv), allowed (B, HI, K, 1, S * PAGE) bool)."""
    B, HQ, K, D = q.shape
    P, HKV, PAGE, _ = k_pages.shape
    HI = blocks.shape[1]
    R = HQ // HI
    page = blocks.long()
    ok = valid & (page >= 0) & (page < block_table.shape[1])
    page = torch.where(ok, page, 0)
    phys = block_table.long()[torch.arange(B, device=q.device).view(B, 1, 1, 1), page]  # (B, HI, K, S)
    ok = ok & (phys >= 0) & (phys < P)
    phys = torch.where(ok, phys, 0)
    kv_head = (torch.arange(HI, device=q.device) // (HI // HKV)).view(1, HI, 1, 1)
    keys = k_pages[phys, kv_head].flatten(3, 4)  # (B, HI, K, S * PAGE, D)
    values = v_pages[phys, kv_head].flatten(3, 4)  # (B, HI, K, S * PAGE, Dv)

    key_index = page[..., None] * PAGE + torch.arange(PAGE, device=q.device)  # (B, HI, K, S, PAGE)
    first = 0 if lo is None else lo.view(B, 1, K, 1, 1)
    allowed = ok[..., None] & (key_index >= first) & (key_index <= hi.view(B, 1, K, 1, 1))
    allowed = allowed.flatten(3, 4)[:, :, :, None, :]  # (B, HI, K, 1, S * PAGE)
    q_lists = q.reshape(B, HI, R, K, D).transpose(2, 3)  # (B, HI, K, R, D)
    return q_lists, keys, values, allowed


def paged_decode_reference(
    q: Tensor,  # (B, HQ, K, D)
    k_pages: Tensor,  # (P, HKV, PAGE, D)
    v_pages: Tensor,  # (P, HKV, PAGE, Dv)
    block_table: Tensor,  # (B, max_pages) integer
    blocks: Tensor,  # (B, HI, K, S) integer: logical pages
    valid: Tensor,  # (B, HI, K, S) bool
    hi: Tensor,  # (B, K) integer: last visible logical key index
    lo: Tensor | None,  # (B, K) integer: first visible logical key index, None = 0
    scale: float,
) -> Tensor:
    """-> (B, HQ, K, Dv) in q's dtype, computed in q's dtype (no autograd restrictions)."""
    B, HQ, K, D = q.shape
    if blocks.shape[-1] == 0:
        return q.new_zeros(B, HQ, K, v_pages.shape[-1])
    q_lists, keys, values, allowed = listed_keys(q, k_pages, v_pages, block_table, blocks, valid, hi, lo)
    logits = torch.matmul(q_lists, keys.transpose(-1, -2)) * scale  # (B, HI, K, R, S * PAGE)
    out = masked_attention(logits, allowed, values)  # (B, HI, K, R, Dv)
    return out.transpose(2, 3).reshape(B, HQ, K, values.shape[-1])
