"""Keys in a decoding cache's pages, and the three branches of a decoding step over them.

`Pages` is the cached form of a branch's keys or values: a pool of pages shared by every row and a
block table mapping each row's logical pages to physical ones (nsa_core/model/cache.py and
nsa_core/serving/paged_cache.py fill them). `PooledBlockKeys` holds one key of each selection block
for a step's selection (select_blocks with a decoding-step Seqs when blocks are scored pooled, or the
caches' block keys with importance "selected_keys", kept in their pages behind the block table).

The branch ops (compressed_attention, selected_attention, sliding_window_attention) take `Pages`
in place of their key / value tensors together with a decoding-step descriptor (`Seqs.step`): they
ask `paged_call` once whether the call is paged, and the functions here name each query's pages
from its device-side position (no host synchronisation: CUDA-graph capturable): the compressed
slots as a list, the selected blocks with the rule "listed and own", the window with the rule
"window" (the kernel forms those pages itself) and run decode_attention (paged split-K kernels, or
their PyTorch twin, which expands the rules: that op decides). Forward only.

Dimension legend: B rows, HQ query heads, HKV kv heads, K queries per row, P pages in the pool,
PAGE keys per page, NP pages per row (the table's width), S listed pages, D / Dv head dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nsa_core.ops.decode_attention import decode_attention
from nsa_core.seqs import Seqs, check_rows


@dataclass(frozen=True)
class Pages:
    """pool (P, HKV, PAGE, D): keys (or values) of every row in pages; table (B, NP) int32 / int64:
    row b's logical page p lives in pool[table[b, p]]. Logical key j of a row is offset j % PAGE of
    its page j // PAGE."""

    pool: Tensor
    table: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.pool, Tensor) or not self.pool.dtype.is_floating_point or self.pool.ndim != 4:
            raise TypeError(f"Pages.pool must be a floating tensor (P, HKV, PAGE, D), got "
                            f"{getattr(self.pool, 'dtype', type(self.pool).__name__)} "
                            f"{tuple(getattr(self.pool, 'shape', ()))}")
        if not isinstance(self.table, Tensor) or self.table.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"Pages.table must be an int32 or int64 tensor, got "
                            f"{getattr(self.table, 'dtype', type(self.table).__name__)}")
        if self.table.ndim != 2:
            raise ValueError(f"Pages.table must be (rows, pages per row), got shape {tuple(self.table.shape)}")
        if self.table.device != self.pool.device:
            raise ValueError(f"Pages.table must be on the pool's device ({self.pool.device}), got {self.table.device}")

    @property
    def page_size(self) -> int:
        return self.pool.shape[2]

    @property
    def heads(self) -> int:
        return self.pool.shape[1]


class PooledBlockKeys:
    """One key per selection block of every row, what a decoding step's selection scores when blocks are
    scored pooled (the mean of each block's compressed keys) or by block keys (importance
    "selected_keys": each block's mean rotated key). Given as keys (B, HKV, NB, D), or as a cache holds
    them: pages (P, HKV, D) of one key behind a block table (B, NB) (`keys` then gathers them; the
    fused step kernel reads them in place)."""

    def __init__(self, keys: Tensor | None = None, *, pages: Tensor | None = None, table: Tensor | None = None):
        if (keys is None) == (pages is None) or (pages is None) != (table is None):
            raise ValueError("PooledBlockKeys takes keys (B, HKV, NB, D), or pages (P, HKV, D) and a table (B, NB)")
        if pages is not None and (pages.ndim != 3 or table.ndim != 2):
            raise ValueError(f"PooledBlockKeys needs pages (P, HKV, D) and a table (B, NB), got pages "
                             f"{tuple(pages.shape)}, table {tuple(table.shape)}")
        self._keys, self.pages, self.table = keys, pages, table

    @property
    def keys(self) -> Tensor:
        """(B, HKV, NB, D)."""
        if self._keys is None:
            return self.pages[self.table.long()].transpose(1, 2)
        return self._keys

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, HKV, NB, D), without gathering."""
        if self._keys is None:
            return (self.table.shape[0], self.pages.shape[1], self.table.shape[1], self.pages.shape[2])
        return tuple(self._keys.shape)

    @property
    def device(self) -> torch.device:
        return (self.pages if self._keys is None else self._keys).device

    @property
    def dtype(self) -> torch.dtype:
        return (self.pages if self._keys is None else self._keys).dtype


def paged_call(seqs: Seqs | None, **kv) -> bool:
    """Whether an op call reads its keys from pages: a decoding-step `seqs` with every key / value
    argument a Pages (True), or neither (False); a ValueError / TypeError naming the argument for a
    mix."""
    paged = {name: isinstance(t, Pages) for name, t in kv.items()}
    step = isinstance(seqs, Seqs) and seqs.is_step
    if not step and not any(paged.values()):
        return False
    if not step:
        raise ValueError(f"{', '.join(n for n, p in paged.items() if p)} in pages (Pages) need a decoding-step "
                         f"seqs (Seqs.step)")
    for name, is_pages in paged.items():
        if not is_pages:
            raise TypeError(f"a decoding step (Seqs.step) reads its keys from a cache: {name} must be a "
                            f"nsa_core.ops.paged.Pages, got {type(kv[name]).__name__}")
    return True


def _check_paged(q: Tensor, k: Pages, v: Pages, seqs: Seqs, page_size: int | None = None) -> None:
    if not isinstance(q, Tensor) or q.ndim != 4 or not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating tensor (B, HQ, K, D), got {tuple(getattr(q, 'shape', ()))}")
    if q.shape[-2] != seqs.q_len:
        raise ValueError(f"seqs describes {seqs.q_len} queries per row, got q with {q.shape[-2]} tokens")
    check_rows(seqs, q)
    if k.table.shape != v.table.shape:  # one table in practice; comparing values would read the device
        raise ValueError(f"k and v pages must share one block table, got tables of shapes {tuple(k.table.shape)} "
                         f"and {tuple(v.table.shape)}")
    if k.pool.shape[:3] != v.pool.shape[:3] or k.pool.shape[-1] != q.shape[-1]:
        raise ValueError(f"k pages must be (P, HKV, PAGE, D={q.shape[-1]}) and v pages (P, HKV, PAGE, Dv), got "
                         f"{tuple(k.pool.shape)}, {tuple(v.pool.shape)}")
    if k.table.shape[0] != q.shape[0]:
        raise ValueError(f"the block table holds {k.table.shape[0]} rows, q {q.shape[0]}")
    if page_size is not None and k.page_size != page_size:
        raise ValueError(f"pages of {k.page_size} tokens cannot hold blocks of block_size={page_size}")


def paged_compressed_attention(q: Tensor, ck: Pages, cv: Pages, *, num_memory: int, stride: int, scale: float,
                               seqs: Seqs, backend: str) -> Tensor:
    """Causal compressed attention of a decoding step: the memory tokens and the compressed blocks
    completed before each query, pages of compressed slots (memory first) -> (B, HQ, K, Dv)."""
    _check_paged(q, ck, cv, seqs)
    B, _, K, _ = q.shape
    positions = seqs.query_positions(q.device)
    hi = num_memory + positions // stride - 1
    pages = ck.table.shape[1]
    blocks = torch.arange(pages, device=q.device).view(1, 1, 1, pages).expand(B, ck.heads, K, pages)
    valid = blocks * ck.page_size <= hi[:, None, :, None]
    return decode_attention(q, ck.pool, cv.pool, ck.table, blocks, valid, hi, scale=scale, backend=backend)


def paged_selected_attention(q: Tensor, k: Pages, v: Pages, indices: Tensor, valid: Tensor | None, *,
                             block_size: int, scale: float, seqs: Seqs, backend: str) -> Tensor:
    """Causal selected attention of a decoding step: the selected pages `indices` / `valid`
    (B, HKV or HQ, K, S) and each query's own page, keys up to the query -> (B, HQ, K, Dv)."""
    _check_paged(q, k, v, seqs, page_size=block_size)
    B, HQ, K, _ = q.shape
    if (not isinstance(indices, Tensor) or indices.ndim != 4 or indices.shape[0] != B or indices.shape[2] != K
            or indices.shape[1] not in (k.heads, HQ)):
        raise ValueError(f"indices must be (B={B}, {k.heads} or {HQ}, K={K}, S), got "
                         f"{tuple(getattr(indices, 'shape', ()))}")
    if valid is not None and (not isinstance(valid, Tensor) or valid.dtype != torch.bool
                              or valid.shape != indices.shape):
        raise ValueError(f"valid must be None or a bool tensor of indices' shape {tuple(indices.shape)}")
    positions = seqs.query_positions(q.device)
    listed = torch.ones_like(indices, dtype=torch.bool) if valid is None else valid
    return decode_attention(q, k.pool, v.pool, k.table, indices, listed, positions, scale=scale, backend=backend,
                            lists="listed_and_own")


def paged_window_attention(q: Tensor, k: Pages, v: Pages, *, window: int, scale: float, seqs: Seqs,
                           backend: str) -> Tensor:
    """Causal sliding-window attention of a decoding step: keys positions - window ... positions,
    read from the pages that hold them -> (B, HQ, K, Dv)."""
    _check_paged(q, k, v, seqs)
    return decode_attention(q, k.pool, v.pool, k.table, None, None, seqs.query_positions(q.device), scale=scale,
                            backend=backend, lists="window", window=window)
