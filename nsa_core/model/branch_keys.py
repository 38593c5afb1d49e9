"""BranchKeys: what the three branches of SparseAttention.attend read, in one of two forms.

- Token tensors (SparseAttention.keys_of: whole sequences, packed documents, a sequence-parallel
  shard's gathered sequence): compressed keys / values with the memory tokens first (b, hk, m + c, d),
  the selected branch's rotated keys and values of every token the queries may see (b, hk, s, d),
  and the window's (the same tensors unless the module has independent_kv); with importance
  "selected_keys" also the selected branch's block keys (b, hk, nb, d) (model/selection_keys.py).
- A decoding cache's pages (NSACache.branch_keys, for a decoding-step Seqs): the same fields as
  nsa_core.ops.paged.Pages (the step's selection scores the compressed pages: ops/compressed_selection.py).

Every branch op takes either form; `attend` does not tell them apart.

Dimension legend: b batch, hk kv heads, s keys, c compressed tokens, m memory tokens, nb selection blocks,
d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from nsa_core.ops.paged import Pages, PooledBlockKeys


@dataclass
class BranchKeys:
    compressed_k: Tensor | Pages
    compressed_v: Tensor | Pages
    rotated_k: Tensor | Pages
    v: Tensor | Pages
    window_k: Tensor | Pages | None = None
    window_v: Tensor | Pages | None = None
    selection_keys: Tensor | PooledBlockKeys | None = None  # what the selection scores, when not the compressed keys

    def __post_init__(self) -> None:
        if self.window_k is None:
            self.window_k, self.window_v = self.rotated_k, self.v


def split_branches(k: Tensor, v: Tensor, independent: bool) -> tuple[tuple[Tensor, Tensor], ...]:
    """k, v (b, branches * hk, n, d) from SparseAttention.project -> ((k, v) of the compressed, the
    selected and the window branch): one pair three times when the branches share keys."""
    if not independent:
        return ((k, v),) * 3
    return tuple(zip(k.chunk(3, dim=1), v.chunk(3, dim=1)))
