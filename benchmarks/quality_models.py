"""The four byte-level language models of the quality comparison; they differ only in attention.

- `nsa`: `SparseAttention` (compression + selection + sliding window, gated), causal.
- `dense`: full causal attention (`DenseAttention`: rotary, GQA, flash SDPA).
- `window`: NSA's sliding-window branch alone (`SlidingWindowAttention` below: the same norm,
  fused q/k/v projection, interleaved rotary, causal window, per-head sigmoid gate initialised
  as SparseAttention's sliding gate, and output projection).
- `no_selection`: `SparseAttention` whose selected-branch gate is held at exactly 0
  (`GateWithoutSelection`): compression + window only, the selected branch adds nothing to the
  output and receives no gradient. The branch is still computed (and discarded), so this
  model's tokens/s is not a speed figure for a compression + window design. This ablation is
  used rather than `num_selected_blocks=0`, which still lets each query attend its own
  selection block (a second local branch), and is therefore not "no selection".

Every model is: byte embedding -> depth x (x + attention(x), x + feed_forward(x)) -> RMSNorm
-> logits over 256 bytes. Each attention module norms its own input. The embedding, the
feed-forwards and the head are initialised from the same seed for every variant, and the
attention modules from a second seed, so two variants start from identical non-attention weights.

Parameters: all four share the q/k/v and output projections; NSA adds its compression MLPs
(SparseAttention's default MLP with its hidden width set by `compress_hidden`), intra-block
positions, memory tokens and branch gates, the window model one gate per head. The counts are
reported with the results (full preset: NSA about 6% more parameters than dense in all).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nsa_core import SparseAttention, sliding_window_attention
from nsa_core.model.rotary import RotaryEmbedding
from nsa_core.model.transformer import DenseAttention

VOCAB_SIZE = 256
VARIANTS = ("nsa", "dense", "window", "no_selection")

# SparseAttention's strategy gate: one logit per head and branch, branches in this order
BRANCHES = ("compressed", "selected", "sliding")
SELECTED_BRANCH = BRANCHES.index("selected")
INITIAL_GATE_BIASES = (-2.0, -2.0, 2.0)  # SparseAttention's default: favour the sliding window


@dataclass(frozen=True)
class ModelShape:
    """Sizes shared by every variant, and NSA's block geometry (used by nsa and no_selection;
    `window` is also the window of the window-only model)."""

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

    def __init__(self, dim: int, dim_head: int, heads: int, kv_heads: int, window: int, backend: str = "auto"):
        super().__init__()
        self.heads, self.kv_heads, self.dim_head, self.window, self.backend = heads, kv_heads, dim_head, window, backend
        self.norm = nn.RMSNorm(dim)
        self.qkv_split = (heads * dim_head, kv_heads * dim_head, kv_heads * dim_head)
        self.to_qkv = nn.Linear(dim, sum(self.qkv_split), bias=False)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.to_gate = nn.Linear(dim, heads)
        nn.init.zeros_(self.to_gate.weight)
        nn.init.constant_(self.to_gate.bias, INITIAL_GATE_BIASES[-1])
        self.combine_heads = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (b, n, dim) -> (b, n, dim)."""
        x = self.norm(x)
        q, k, v = (t.unflatten(-1, (-1, self.dim_head)).transpose(1, 2) for t in self.to_qkv(x).split(self.qkv_split, -1))
        q, k = (self.rotary_emb.rotate(t, backend=self.backend) for t in (q, k))
        out = sliding_window_attention(q, k, v, window=self.window, causal=True, scale=self.dim_head ** -0.5,
                                       backend=self.backend)  # (b, h, n, d)
        gate = self.to_gate(x).sigmoid().transpose(1, 2).unsqueeze(-1)  # (b, h, n, 1)
        return self.combine_heads((out * gate).transpose(1, 2).flatten(-2))


class GateWithoutSelection(nn.Module):
    """SparseAttention's strategy gate (Linear dim -> 3 * heads, initialised as the default one)
    with the selected branch's logit held at -inf: its sigmoid is exactly 0."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.linear = nn.Linear(dim, len(BRANCHES) * heads)
        nn.init.zeros_(self.linear.weight)
        with torch.no_grad():
            self.linear.bias.copy_(torch.tensor(INITIAL_GATE_BIASES * heads))
        is_selected = torch.arange(len(BRANCHES) * heads) % len(BRANCHES) == SELECTED_BRANCH
        self.register_buffer("is_selected", is_selected, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).masked_fill(self.is_selected, float("-inf"))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class ByteLanguageModel(nn.Module):
    def __init__(self, dim: int, attentions: list[nn.Module], feed_forwards: list[nn.Module]):
        super().__init__()
        if len(attentions) != len(feed_forwards):
            raise ValueError(f"attentions and feed_forwards must pair up, got {len(attentions)} and {len(feed_forwards)}")
        self.embed = nn.Embedding(VOCAB_SIZE, dim)
        self.attentions = nn.ModuleList(attentions)
        self.feed_forwards = nn.ModuleList(feed_forwards)
        self.norm = nn.RMSNorm(dim)
        self.to_logits = nn.Linear(dim, VOCAB_SIZE, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (b, n) of bytes -> logits (b, n, 256) for the next byte."""
        x = self.embed(ids)
        for attention, ff in zip(self.attentions, self.feed_forwards):
            x = x + attention(x)
            x = x + ff(x)
        return self.to_logits(self.norm(x))


def sparse_attention(shape: ModelShape, backend: str, **modules: nn.Module) -> SparseAttention:
    return SparseAttention(
        dim=shape.dim, dim_head=shape.dim_head, heads=shape.heads, kv_heads=shape.kv_heads, causal=True,
        sliding_window_size=shape.window, compress_block_size=shape.compress_block,
        compress_block_sliding_stride=shape.compress_stride, selection_block_size=shape.selection_block,
        num_selected_blocks=shape.num_selected,
        compress_mlp_expand_factor=shape.compress_hidden / (shape.compress_block * shape.dim_head),
        backend=backend, **modules,
    )


def make_attention(variant: str, shape: ModelShape, backend: str = "auto") -> nn.Module:
    """One attention layer of `variant` (one of VARIANTS)."""
    if variant == "nsa":
        return sparse_attention(shape, backend)
    if variant == "no_selection":
        return sparse_attention(shape, backend, strategy_combine_mlp=GateWithoutSelection(shape.dim, shape.heads))
    if variant == "dense":
        return DenseAttention(shape.dim, dim_head=shape.dim_head, heads=shape.heads, kv_heads=shape.kv_heads, causal=True)
    if variant == "window":
        return SlidingWindowAttention(shape.dim, shape.dim_head, shape.heads, shape.kv_heads, shape.window, backend)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def build_language_model(variant: str, shape: ModelShape, seed: int, backend: str = "auto") -> ByteLanguageModel:
    """A fresh model of `variant`: feed-forwards from `seed`, attention from `seed + 1`,
    embedding and head from `seed + 2` (identical non-attention weights across variants)."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # NSAConfig's note on tiny ablation settings
        torch.manual_seed(seed)
        feed_forwards = [feed_forward(shape.dim, shape.ff_mult) for _ in range(shape.depth)]
        torch.manual_seed(seed + 1)
        attentions = [make_attention(variant, shape, backend) for _ in range(shape.depth)]
        torch.manual_seed(seed + 2)
        return ByteLanguageModel(shape.dim, attentions, feed_forwards)


def parameter_counts(model: ByteLanguageModel) -> dict[str, int]:
    """{"params": all parameters, "attention_params": those of the attention layers}."""
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "attention_params": sum(p.numel() for p in model.attentions.parameters()),
    }


@torch.no_grad()
def branch_gate_means(model: ByteLanguageModel, ids: Tensor) -> list[dict[str, float]] | None:
    """Mean sigmoid gate of each NSA branch per layer over `ids` (b, n): where the model routes
    its attention (None for models without SparseAttention layers). Read through a forward hook
    on each layer's `to_strategy_combine` (output (b, h, n, 3))."""
    layers = [a for a in model.attentions if isinstance(a, SparseAttention) and hasattr(a, "to_strategy_combine")]
    if not layers:
        return None
    captured: list[Tensor] = []
    hooks = [a.to_strategy_combine.register_forward_hook(lambda _m, _i, out: captured.append(out.float().mean((0, 1, 2))))
             for a in layers]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return [{name: round(float(mean[i]), 4) for i, name in enumerate(BRANCHES)} for mean in captured]
