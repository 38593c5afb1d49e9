"""Attention layers shared by the benchmarks that train models differing only in attention
(quality_models.py, retrieval/): the model shape, NSA's SparseAttention built from it, NSA's
sliding-window branch as a module of its own, a strategy gate with any subset of branches held
at 0, and the feed-forward block.

- `SlidingWindowAttention`: the same norm, fused q/k/v projection, interleaved rotary, causal
  window, per-head sigmoid gate initialised as SparseAttention's sliding gate, and output
  projection as NSA's window branch.
- `BranchGate`: SparseAttention's strategy gate (Linear dim -> 3 * heads, zero weights, biases
  per branch) whose logits for the branches in `off` are held at -inf: their sigmoid is exactly
  0, so those branches add nothing to the output and receive no gradient (they are still
  computed and discarded: a model using it is no speed figure for the remaining branches).
  This is used rather than e.g. `num_selected_blocks=0`, which still lets each query attend its
  own selection block (a second local branch).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nsa_core import SparseAttention, sliding_window_attention
from nsa_core.model.rotary import RotaryEmbedding
from nsa_core.ops.rotary import rotary
from nsa_core.seqs import Seqs

# SparseAttention's strategy gate: one logit per head and branch, branches in this order
BRANCHES = ("compressed", "selected", "sliding")
INITIAL_GATE_BIASES = (-2.0, -2.0, 2.0)  # SparseAttention's default: favour the sliding window


@dataclass(frozen=True)
class ModelShape:
    """Sizes shared by every variant, and NSA's block geometry (`window` is also the window of
    the window-only model)."""

    dim: int
    depth: int
    heads: int
    kv_heads: int
    dim_head: int
    ff_mult: int
    window: int
    compress_block: int
    compress_stride: int
    selection_block: int
    num_selected: int
    compress_hidden: int  # hidden width of NSA's compression MLP (block * dim_head inputs -> this -> dim_head)


class SlidingWindowAttention(nn.Module):
    """NSA's sliding-window branch as a module of its own: norm, fused q/k/v projection,
    interleaved rotary, causal window attention, a sigmoid gate per head, output projection."""

    def __init__(self, dim: int, dim_head: int, heads: int, kv_heads: int, window: int, backend: str = "auto",
                 gate_bias: float = INITIAL_GATE_BIASES[-1]):
        super().__init__()
        self.heads, self.kv_heads, self.dim_head, self.window, self.backend = heads, kv_heads, dim_head, window, backend
        self.norm = nn.RMSNorm(dim)
        self.qkv_split = (heads * dim_head, kv_heads * dim_head, kv_heads * dim_head)
        self.to_qkv = nn.Linear(dim, sum(self.qkv_split), bias=False)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.to_gate = nn.Linear(dim, heads)
        nn.init.zeros_(self.to_gate.weight)
        nn.init.constant_(self.to_gate.bias, gate_bias)
        self.combine_heads = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """x (b, n, dim) -> (b, n, dim); cu_seqlens: x (1, total, dim) holds packed documents, each
        attended alone (as SparseAttention.forward takes them)."""
        seqs = None if cu_seqlens is None else Seqs.packed(cu_seqlens, x.shape[1], device=x.device)
        x = self.norm(x)
        q, k, v = (t.unflatten(-1, (-1, self.dim_head)).transpose(1, 2) for t in self.to_qkv(x).split(self.qkv_split, -1))
        cos, sin = self.rotary_emb.tables(torch.arange(x.shape[1], device=x.device), q.dtype)
        q, k = (rotary(t, cos, sin, backend=self.backend) for t in (q, k))
        out = sliding_window_attention(q, k, v, window=self.window, causal=True, scale=self.dim_head ** -0.5,
                                       backend=self.backend, seqs=seqs)  # (b, h, n, d)
        gate = self.to_gate(x).sigmoid().transpose(1, 2).unsqueeze(-1)  # (b, h, n, 1)
        return self.combine_heads((out * gate).transpose(1, 2).flatten(-2))


class BranchGate(nn.Module):
    """SparseAttention's strategy gate (Linear dim -> 3 * heads, zero weights, `biases` per branch)
    with the logits of the branches in `off` held at -inf: their sigmoid is exactly 0."""

    def __init__(self, dim: int, heads: int, off: Iterable[str], biases: tuple[float, float, float] = INITIAL_GATE_BIASES):
        super().__init__()
        off = tuple(off)
        unknown = sorted(set(off) - set(BRANCHES))
        if unknown:
            raise ValueError(f"off must name branches among {BRANCHES}, got {unknown}")
        if len(biases) != len(BRANCHES):
            raise ValueError(f"biases must hold one value per branch {BRANCHES}, got {biases!r}")
        self.off = off
        self.linear = nn.Linear(dim, len(BRANCHES) * heads)
        nn.init.zeros_(self.linear.weight)
        with torch.no_grad():
            self.linear.bias.copy_(torch.tensor(tuple(biases) * heads, dtype=torch.float32))
        held = torch.tensor([BRANCHES[i % len(BRANCHES)] in off for i in range(len(BRANCHES) * heads)])
        self.register_buffer("held", held, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).masked_fill(self.held, float("-inf"))

    def extra_repr(self) -> str:
        return f"off={self.off}"


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


def sparse_attention(shape: ModelShape, backend: str, **options) -> SparseAttention:
    """A causal SparseAttention of `shape`; `options` (extra keyword arguments of SparseAttention,
    e.g. a `strategy_combine_mlp` module or config options) are passed straight through."""
    return SparseAttention(
        dim=shape.dim, dim_head=shape.dim_head, heads=shape.heads, kv_heads=shape.kv_heads, causal=True,
        sliding_window_size=shape.window, compress_block_size=shape.compress_block,
        compress_block_sliding_stride=shape.compress_stride, selection_block_size=shape.selection_block,
        num_selected_blocks=shape.num_selected,
        compress_mlp_expand_factor=shape.compress_hidden / (shape.compress_block * shape.dim_head),
        backend=backend, **options,
    )
