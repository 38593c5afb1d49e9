"""The public paged decode attention: input checks, and its torch.library op with a fake (meta)
implementation, so torch.compile(fullgraph=True) traces it. Forward only: no autograd is
registered (inference); its PyTorch twin is nsa_core.reference.paged_decode.

Dimension legend: B batch, HQ query heads, HKV kv heads, G = HQ / HKV, HI lists (HKV or HQ),
K query tokens per sequence, S slots per list, P physical pages, PAGE keys per page, D / Dv head dims.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from nsa_core.kernels.decode.launch import KERNEL_DTYPES, LIST_RULES, MAX_HEAD_DIM, PAGE_SIZES, paged_decode_fwd

INDEX_DTYPES = (torch.int32, torch.int64)


@torch.library.custom_op("nsa::paged_decode_attention", mutates_args=())
def _paged_decode(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, blocks: Tensor | None,
                  valid: Tensor | None, hi: Tensor, lo: Tensor | None, scale: float, num_splits: int | None,
                  lists: str, window: int) -> Tensor:
    return paged_decode_fwd(q, k_pages, v_pages, block_table, blocks, valid, hi, lo, scale, num_splits, lists, window)


@_paged_decode.register_fake
def _paged_decode_fake(q, k_pages, v_pages, block_table, blocks, valid, hi, lo, scale, num_splits, lists, window):
    return q.new_empty(*q.shape[:-1], v_pages.shape[-1])


def paged_decode_attention(
    q: Tensor,  # (B, HQ, K, D)
    k_pages: Tensor,  # (P, HKV, PAGE, D)
    v_pages: Tensor,  # (P, HKV, PAGE, Dv)
    block_table: Tensor,  # (B, max_pages) int32 / int64
    blocks: Tensor | None,  # (B, HI, K, S) int32 / int64 (None with lists="window")
    valid: Tensor | None,  # (B, HI, K, S) bool (None with lists="window")
    hi: Tensor,  # (B, K) int32 / int64
    lo: Tensor | None,  # (B, K) int32 / int64, or None (= 0)
    scale: float,
    *,
    num_splits: int | None = None,
    lists: str = "listed",
    window: int = 0,
) -> Tensor:
    """Attention of K new query tokens per sequence over lists of key blocks in a paged cache, for
    the three NSA branches at decode time. Forward only (inference): no gradients flow through it.

    Logical page p of sequence b lives in physical page block_table[b, p] of the pools k_pages,
    v_pages. Query head h of token k attends the list i = h // (HQ / HI) (HI = HKV: one list per kv
    group, shared by its G query heads; HI = HQ: one per head), whose slots s name logical pages
    blocks[b, i, k, s]. Keys are read only for slots with valid[b, i, k, s] (the others' ids may be
    garbage and are never used; a valid id outside [0, max_pages), or one mapping to a physical page
    outside [0, P), is skipped as well, so nothing is read out of bounds), and only at logical key
    indices j = page * PAGE + offset with lo[b, k] <= j <= hi[b, k]. The result is
    softmax(scale * q . k) v over those keys, accumulated in float32; a query with no visible key
    gets zeros. A list must not hold the same valid page twice.

    lists: how a query's pages are named. "listed": the slots above. "listed_and_own": the listed
    slots, then the query's own page hi[b, k] // PAGE (the selected branch: its blocks and the one it
    sits in). "window": no list (blocks, valid and lo None): the pages holding the keys
    hi[b, k] - window ... hi[b, k], one list per kv head, keys from hi - window on (the sliding window).
    The kernel builds those lists itself: a decoding step spends no tensor op on them.

    Forward only: the op has no autograd formula (a backward through it raises).

    -> (B, HQ, K, Dv) in q's dtype. num_splits: how many programs share one list (flash-decoding);
    None chooses from the shapes and the device. No host synchronisation: CUDA-graph capturable.
    """
    _check_lists(lists, window, blocks, valid, lo)
    _check_inputs(q, k_pages, v_pages, block_table, blocks, valid, hi, lo, scale, num_splits)
    return _paged_decode(q, k_pages, v_pages, block_table, blocks, valid, hi, lo, float(scale), num_splits, lists,
                         int(window))


def _check_lists(lists, window, blocks, valid, lo) -> None:
    if lists not in LIST_RULES:
        raise ValueError(f"lists must be one of {sorted(LIST_RULES)}, got {lists!r}")
    if lists == "window":
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"lists='window' needs window, an int >= 1, got {window!r}")
        if blocks is not None or valid is not None or lo is not None:
            raise ValueError("lists='window' builds each query's pages itself: blocks, valid and lo must be None")
    elif blocks is None or valid is None:
        raise ValueError(f"lists={lists!r} needs blocks and valid tensors")


def _check_tensor(name: str, t, dims: int, dtypes: tuple, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (q's device), got {t.device}")


def _check_inputs(q, k_pages, v_pages, block_table, blocks, valid, hi, lo, scale, num_splits) -> None:
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a tensor, got {type(q).__name__}")
    device = q.device
    _check_tensor("q", q, 4, KERNEL_DTYPES, device)
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        _check_tensor(name, t, 4, (q.dtype,), device)
    _check_tensor("block_table", block_table, 2, INDEX_DTYPES, device)
    if blocks is not None:
        _check_tensor("blocks", blocks, 4, INDEX_DTYPES, device)
        _check_tensor("valid", valid, 4, (torch.bool,), device)
    _check_tensor("hi", hi, 2, INDEX_DTYPES, device)
    if lo is not None:
        _check_tensor("lo", lo, 2, INDEX_DTYPES, device)

    B, HQ, K, D = q.shape
    P, HKV, page_size, Dk = k_pages.shape
    if Dk != D:
        raise ValueError(f"k_pages' head dim must equal q's ({D}), got shape {tuple(k_pages.shape)}")
    if v_pages.shape[:3] != k_pages.shape[:3]:
        raise ValueError(f"v_pages must be (P, HKV, page_size, Dv) = ({P}, {HKV}, {page_size}, Dv), "
                         f"got shape {tuple(v_pages.shape)}")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page_size (k_pages.shape[2]) must be one of {PAGE_SIZES}, got {page_size}")
    if not (0 < D <= MAX_HEAD_DIM and 0 < v_pages.shape[-1] <= MAX_HEAD_DIM):
        raise ValueError(f"head dims D and Dv must be in 1..{MAX_HEAD_DIM}, got D={D}, Dv={v_pages.shape[-1]}")
    if HKV == 0 or HQ % HKV != 0:
        raise ValueError(f"q's heads ({HQ}) must be a multiple of the kv heads (k_pages.shape[1] = {HKV})")
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must be (B, max_pages) with B = {B}, got shape {tuple(block_table.shape)}")
    if blocks is not None and (blocks.shape[0] != B or blocks.shape[2] != K or blocks.shape[1] not in (HKV, HQ)):
        raise ValueError(f"blocks must be (B, HI, K, S) with B = {B}, K = {K}, HI = {HKV} (kv heads) or {HQ} (query "
                         f"heads), got shape {tuple(blocks.shape)}")
    if blocks is not None and valid.shape != blocks.shape:
        raise ValueError(f"valid must have blocks' shape {tuple(blocks.shape)}, got {tuple(valid.shape)}")
    for name, t in (("hi", hi), ("lo", lo)):
        if t is not None and t.shape != (B, K):
            raise ValueError(f"{name} must be (B, K) = ({B}, {K}), got shape {tuple(t.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"the decode kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}")
