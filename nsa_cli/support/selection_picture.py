"""The query-block x key-block picture of one (batch, head) of a module's selection
(`nsa visualize-selection`), built at the picture's resolution from per-block statistics.

Memory is linear in the sequence length at any length: the selection itself is (n, S) indices;
the picture has at most `cells` x `cells` cells, each `factor` x `factor` selection blocks (counts
add up; a cell is own block / window reach if any of its blocks is, future only if all are);
the JSON lists, per query block, only the key blocks it selected (at most n x S entries), never a
blocks x blocks grid.

Dimension legend: n tokens, S selected slots, NB selection blocks, R picture cells per side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nsa_cli.support.analysis import branch_costs
from nsa_core.config import NSAConfig
from nsa_core.model.attention import SparseAttention

# categories of a picture cell, for renderers
NOT_ATTENDED, FUTURE, WINDOW, OWN, SELECTED_FEW, SELECTED_SOME, SELECTED_MANY = range(7)


def selection_heads(cfg: NSAConfig) -> int:
    """How many heads the selection has: kv heads when query heads share it, else query heads."""
    return cfg.num_kv_heads if cfg.query_heads_share_selected_kv else cfg.heads


def check_head(cfg: NSAConfig, head: int) -> None:
    heads = selection_heads(cfg)
    if not 0 <= head < heads:
        raise ValueError(f"--head must be in [0, {heads - 1}] (heads of the selection), got {head}")


@dataclass
class SelectionPicture:
    """The picture (R x R cells of factor x factor selection blocks) and per-block statistics."""

    block_size: int  # tokens per selection block
    factor: int  # selection blocks per cell side
    num_blocks: int  # NB
    counts: Tensor  # (R, R) int: selections of the cell's key blocks by the cell's queries
    own: Tensor  # (R, R) bool: holds a query block's own block (causal)
    window: Tensor  # (R, R) bool: the sliding window reaches into it
    future: Tensor  # (R, R) bool: after every query of the cell row (causal edge)
    selected: dict[int, list[tuple[int, int]]]  # query block -> [(key block, queries that chose it)]
    sparsity: dict[str, float]  # fraction of causal (or all) query-key pairs each branch touches

    def categories(self) -> Tensor:
        """(R, R) int: one category per cell; selected cells graded by how many queries chose the
        cell's blocks, relative to the busiest cell."""
        cats = torch.full(self.counts.shape, NOT_ATTENDED, dtype=torch.long)
        cats[self.future] = FUTURE
        cats[self.window] = WINDOW
        cats[self.own] = OWN
        top = max(1, int(self.counts.max())) if self.counts.numel() else 1
        sel = self.counts > 0
        cats[sel] = SELECTED_FEW + torch.clamp((3 * self.counts[sel] - 1) // top, 0, 2)
        return cats


def picture_factor(num_blocks: int, cells: int) -> int:
    """Selection blocks per cell side so that the picture has at most `cells` cells per side."""
    return max(1, math.ceil(num_blocks / max(1, cells)))


def selection_picture(module: SparseAttention, row: Tensor, head: int, cells: int) -> SelectionPicture:
    """The picture of head `head` for one input row (1, n, dim), at most `cells` cells per side."""
    cfg = module.config
    check_head(cfg, head)
    n, bs = row.shape[1], cfg.selection_block_size
    nb = math.ceil(n / bs)
    f = picture_factor(nb, cells)
    R = math.ceil(nb / f)
    selection = module.select(row)
    counts = torch.zeros(R * R, dtype=torch.long)
    selected: dict[int, list[tuple[int, int]]] = {}
    picked = 0
    if selection is not None:
        idx, valid = selection.indices[0, head].cpu(), selection.valid[0, head].cpu()  # (n, S)
        q_block = (torch.arange(n) // bs)[:, None].expand_as(idx)[valid]
        k_block = idx[valid]
        picked = int(k_block.numel())
        counts.index_add_(0, (q_block // f) * R + k_block // f, torch.ones_like(k_block))
        pairs, per_pair = torch.unique(q_block * nb + k_block, return_counts=True)  # sorted by query block
        for key, c in zip(pairs.tolist(), per_pair.tolist()):
            selected.setdefault(key // nb, []).append((key % nb, c))
    cell = torch.arange(R)
    qi, kj = cell[:, None], cell[None, :]
    own = (qi == kj) & torch.tensor(cfg.causal)
    w = cfg.sliding_window_size
    first_q = cell * f  # the first and last query block of each cell row
    last_q = torch.clamp(cell * f + f - 1, max=nb - 1)
    lo = (first_q * bs - w).clamp(min=0) // bs // f  # the window's reach, in cells
    hi = cell if cfg.causal else ((last_q * bs + bs - 1 + w).clamp(max=n - 1) // bs // f)
    window = (kj >= lo[:, None]) & (kj <= hi[:, None])
    future = (kj > qi) & torch.tensor(cfg.causal)
    return SelectionPicture(bs, f, nb, counts.view(R, R), own, window, future, selected,
                            _sparsity(cfg, n, picked))


def _sparsity(cfg: NSAConfig, n: int, picked: int) -> dict[str, float]:
    """Fraction of the query-key pairs dense attention scores that each branch scores."""
    costs = {c.name: c.keys_per_query for c in branch_costs(cfg, n, 1)}
    dense_pairs = costs["dense attention"] * n
    bs = cfg.selection_block_size
    full, rest = divmod(n, bs)
    own_pairs = (full * bs * (bs + 1) / 2 + rest * (rest + 1) / 2) if cfg.causal else 0.0
    return {
        "selected": min(1.0, (picked * bs + own_pairs) / dense_pairs),
        "sliding window": costs["sliding window"] / costs["dense attention"],
        "compressed": costs["compressed"] / costs["dense attention"],
    }
