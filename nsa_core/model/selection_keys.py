"""The selected branch's block keys, what importance "selected_keys" scores: one key per selection
block, the mean of the block's rotated selected-branch keys, so that a query's score of a block is the
mean of the selected branch's own logits over the block's tokens (ops/block_selection.py).

Whole sequences: the n // block complete blocks. Packed documents (Seqs with cu_seqlens): blocks
restart at every document, document i's block j in slot cu_seqlens[i] // block + j of the n // block
slots, as the compressed tokens of windows of one block at a stride of one block (model/compression.py).
A decoding cache (pages of one selection block each) keeps one block key per page, refreshed by its
writes (model/cache.py), and a step reads them behind the row's block table (a page not complete yet is
never visible to the selection, whatever its key).

Dimension legend: b batch, hk kv heads, n tokens, nb selection blocks, d head dim, np pages per row.
"""

from __future__ import annotations

from torch import Tensor

from nsa_core.model.compression import compression_windows
from nsa_core.ops.paged import PooledBlockKeys
from nsa_core.seqs import Seqs


def block_mean_keys(rotated_k: Tensor, selection_block_size: int, seqs: Seqs | None = None) -> Tensor:
    """Rotated selected-branch keys (b, hk, n, d) -> block keys (b, hk, n // selection_block_size, d)."""
    block = selection_block_size
    if seqs is not None and seqs.is_packed:
        return compression_windows(rotated_k, block, block, seqs).mean(dim=-2)
    nb = rotated_k.shape[-2] // block
    return rotated_k[:, :, : nb * block].unflatten(-2, (nb, block)).mean(dim=-2)


def cached_block_keys(block_key_pages: Tensor, block_table: Tensor) -> PooledBlockKeys:
    """A cache's block key per physical page (pages, hk, d) behind its block table (b, np) -> the block
    keys of every logical page (b, hk, np, d), left in the pages (the step kernel reads them there)."""
    return PooledBlockKeys(pages=block_key_pages, table=block_table)
