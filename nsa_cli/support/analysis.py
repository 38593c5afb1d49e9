"""What a configuration costs: parameter counts by part, FLOPs and activation memory of each
branch next to dense attention (the CLI's `config show`), and the random input rows the CLI
feeds a module. The selection picture is nsa_cli/support/selection_picture.py."""

from __future__ import annotations

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


def random_row(dim: int, seq_len: int, seed: int = 0, index: int = 0) -> Tensor:
    """Row `index` (1, seq_len, dim) of the CLI's random inputs, made alone (memory of one row at
    any index); row 0 is random_input(dim, seq_len, 1, seed)."""
    check_positive_int("seq_len", seq_len)
    gen = torch.Generator().manual_seed(seed if index == 0 else hash((seed, index)) & (2**63 - 1))
    return torch.randn(1, seq_len, dim, generator=gen)


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
