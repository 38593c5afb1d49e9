"""What a configuration costs and what a module selects: parameter counts by part, FLOPs and
activation memory of each branch next to dense attention, and the query-block x key-block
selection grid (the CLI's `config show` and `visualize-selection`).

Dimension legend: b batch, h heads of the selection, n sequence, S selected slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nsa_core.config import NSAConfig
from nsa_core.ops.validation import check_positive_int
from nsa_core.reference.selection import num_scored_blocks
from nsa_core.model.attention import SparseAttention

PARTS = {
    "projections": ("to_qkv", "combine_heads"),
    "norm": ("norm",),
    "compression": ("k_compress", "v_compress", "compress_mem_kv", "k_intrablock_positions", "v_intrablock_positions"),
    "combine gate": ("to_strategy_combine",),
}


def parameter_counts_for_config(cfg: NSAConfig) -> dict[str, int]:
    """parameter_counts of a default-built module, without allocating its weights."""
    with torch.device("meta"):
        return parameter_counts(SparseAttention.from_config(cfg))


def random_input(dim: int, seq_len: int, batch: int = 1, seed: int = 0) -> Tensor:
    check_positive_int("seq_len", seq_len)
    return torch.randn(batch, seq_len, dim, generator=torch.Generator().manual_seed(seed))


def parameter_counts(module: SparseAttention) -> dict[str, int]:
    counts = {part: 0 for part in PARTS}
    for name, p in module.named_parameters():
        head = name.split(".")[0]
        part = next((k for k, prefixes in PARTS.items() if head in prefixes), "other")
        counts[part] = counts.get(part, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts


@dataclass
class BranchCost:
    name: str
    keys_per_query: float  # average over the queries
    flops: float  # forward, multiply-adds counted as 2
    activation_bytes: float  # what the forward keeps per layer (outputs and softmax statistics)


def _sum_floor_div(T: int, s: int) -> int:
    """sum of t // s over t in 0..T-1."""
    q, r = divmod(T, s)
    return s * q * (q - 1) // 2 + r * q


def _sum_mod(T: int, s: int) -> int:
    """sum of t % s over t in 0..T-1."""
    q, r = divmod(T, s)
    return q * s * (s - 1) // 2 + r * (r - 1) // 2


def _sum_above(T: int, a: int) -> int:
    """sum of max(t - a, 0) over t in 0..T-1."""
    if a < 0:
        return T * (T - 1) // 2 - a * T
    n = max(0, T - 1 - a)
    return n * (n + 1) // 2


def branch_costs(cfg: NSAConfig, seq_len: int, batch: int = 1, bytes_per_element: int = 2) -> list[BranchCost]:
    """Forward FLOPs of attention (QK^T and PV, 4 * d per query-key pair per head) per branch, in
    closed form (exact integer sums over the T queries: no tensor of size T)."""
    check_positive_int("seq_len", seq_len)
    T, H, d, stride, w = seq_len, cfg.heads, cfg.dim_head, cfg.stride, cfg.sliding_window_size
    C = T // stride
    M = cfg.num_compressed_mem_kv
    per_pair = 4 * d * H * batch
    if cfg.causal:  # query t sees compressed blocks t // stride (<= C), keys t - w .. t, its own block's t % sel + 1
        compressed_keys = M + _sum_floor_div(T, stride) / T
        dense_keys = (T + 1) / 2
        window_keys = (T * (T - 1) // 2 - _sum_above(T, w) + T) / T
        own = (_sum_mod(T, cfg.selection_block_size) + T) / T
    else:  # query t sees keys max(t - w, 0) .. min(t + w, T - 1)
        compressed_keys = M + C
        dense_keys = T
        reach_right = T * (T - 1) // 2 + w * T - _sum_above(T, T - 1 - w)
        window_keys = (reach_right - _sum_above(T, w) + T) / T
        own = 0.0
    nb = num_scored_blocks(C, stride, cfg.selection_block_size)
    selected_keys = min(cfg.num_selected_blocks, nb) * cfg.selection_block_size + own
    out_bytes = batch * T * H * d * bytes_per_element
    lse_bytes = batch * T * H * 4
    return [
        BranchCost("compressed", compressed_keys, per_pair * T * compressed_keys, out_bytes + lse_bytes),
        BranchCost("selected", selected_keys, per_pair * T * selected_keys, out_bytes + lse_bytes + batch * T * H * cfg.num_selected_blocks * 4),
        BranchCost("sliding window", window_keys, per_pair * T * window_keys, out_bytes + lse_bytes),
        BranchCost("dense attention", dense_keys, per_pair * T * dense_keys, out_bytes + lse_bytes),
    ]


def selection_of(module: SparseAttention, inp: Tensor):
    """Run the module up to block selection: Selection (indices/valid (b, h, n, S)) or None."""
    return module.select(inp)


@dataclass
class SelectionGrid:
    """Query-block x key-block picture of one (batch, head) of the selection."""

    block_size: int
    counts: Tensor  # (QB, KB) int: how many queries of the query block selected the key block
    own: Tensor  # (QB, KB) bool: the always-attended own block (causal)
    window: Tensor  # (QB, KB) bool: key blocks the sliding window reaches from the query block
    future: Tensor  # (QB, KB) bool: key blocks after the query block (causal edge)
    selected_per_query_block: list[list[int]]  # key blocks any query of the block selected
    sparsity: dict[str, float]  # fraction of causal (or all) query-key pairs each branch touches


def selection_grid(module: SparseAttention, inp: Tensor, head: int = 0, batch_index: int = 0) -> SelectionGrid:
    cfg = module.config
    selection = selection_of(module, inp)
    n = inp.shape[1]
    heads_of_selection = module.kv_heads if cfg.query_heads_share_selected_kv else module.heads
    if not 0 <= head < heads_of_selection:
        raise ValueError(f"head must be in [0, {heads_of_selection - 1}] (heads of the selection), got {head}")
    if not 0 <= batch_index < inp.shape[0]:
        raise ValueError(f"batch index must be in [0, {inp.shape[0] - 1}], got {batch_index}")
    bs = cfg.selection_block_size
    nb = math.ceil(n / bs)
    counts = torch.zeros(nb, nb, dtype=torch.long)
    if selection is not None:
        idx = selection.indices[batch_index, head].cpu()  # (n, S)
        valid = selection.valid[batch_index, head].cpu()
        q_block = (torch.arange(n) // bs)[:, None].expand_as(idx)
        counts.index_put_((q_block[valid], idx[valid]), torch.ones(int(valid.sum()), dtype=torch.long), accumulate=True)
    qb = torch.arange(nb)[:, None]
    kb = torch.arange(nb)[None, :]
    own = (qb == kb) & torch.tensor(cfg.causal)
    w = cfg.sliding_window_size
    # query block [qb*bs, qb*bs+bs-1] reaches keys down to qb*bs - w (and up to +w when not causal)
    lo = (qb * bs - w).clamp(min=0) // bs
    hi = qb if cfg.causal else ((qb * bs + bs - 1 + w).clamp(max=n - 1) // bs)
    window = (kb >= lo) & (kb <= hi)
    future = (kb > qb) & torch.tensor(cfg.causal)
    selected = [torch.nonzero(counts[i]).flatten().tolist() for i in range(nb)]
    # fraction of the query-key pairs dense attention would score that each branch scores
    costs = {c.name: c.keys_per_query for c in branch_costs(cfg, n, 1)}
    dense_pairs = costs["dense attention"] * n
    own_pairs = float((torch.arange(n) % bs + 1).sum()) if cfg.causal else 0.0
    sparsity = {
        "selected": min(1.0, (float(counts.sum()) * bs + own_pairs) / dense_pairs),
        "sliding window": costs["sliding window"] / costs["dense attention"],
        "compressed": costs["compressed"] / costs["dense attention"],
    }
    return SelectionGrid(bs, counts, own, window, future, selected, sparsity)


# categories of a grid cell, for renderers
NOT_ATTENDED, FUTURE, WINDOW, OWN, SELECTED_FEW, SELECTED_SOME, SELECTED_MANY = range(7)


def grid_categories(grid: SelectionGrid) -> Tensor:
    """(QB, KB) int: one category per cell; selected cells graded by how many of the query
    block's queries chose the key block, relative to the grid's busiest cell."""
    cats = torch.full(grid.counts.shape, NOT_ATTENDED, dtype=torch.long)
    cats[grid.future] = FUTURE
    cats[grid.window] = WINDOW
    cats[grid.own] = OWN
    top = max(1, int(grid.counts.max())) if grid.counts.numel() else 1
    sel = grid.counts > 0
    cats[sel] = SELECTED_FEW + torch.clamp((3 * grid.counts[sel] - 1) // top, 0, 2)
    return cats


def downscale_grid(grid: SelectionGrid, factor: int) -> SelectionGrid:
    """Merge factor x factor cells: counts add up; own and window if any cell has them; future
    only if all cells are future."""
    if factor == 1:
        return grid

    def pool(t: Tensor, reduce) -> Tensor:
        n = t.shape[0]
        pad = -n % factor
        t = torch.nn.functional.pad(t, (0, pad, 0, pad))
        m = (n + pad) // factor
        return reduce(t.view(m, factor, m, factor), (1, 3))

    return SelectionGrid(
        grid.block_size * factor,
        pool(grid.counts, lambda t, d: t.sum(d)),
        pool(grid.own.to(torch.int), lambda t, d: t.amax(d)).bool(),
        pool(grid.window.to(torch.int), lambda t, d: t.amax(d)).bool(),
        pool(grid.future.to(torch.int), lambda t, d: t.amin(d)).bool(),
        grid.selected_per_query_block,
        grid.sparsity,
    )
