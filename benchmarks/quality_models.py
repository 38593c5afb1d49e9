"""The four byte-level language models of the quality comparison; they differ only in attention.

- `nsa`: `SparseAttention` (compression + selection + sliding window, gated), causal.
- `dense`: full causal attention (`DenseAttention`: rotary, GQA, flash SDPA).
- `window`: NSA's sliding-window branch alone (`SlidingWindowAttention`).
- `no_selection`: `SparseAttention` whose selected-branch gate is held at exactly 0 (`BranchGate`
  with the selected branch off): compression + window only, the selected branch adds nothing to
  the output and receives no gradient. The branch is still computed (and discarded), so this
  model's tokens/s is not a speed figure for a compression + window design.

The layers, the model shape and the gate are benchmarks/attention_layers.py's (shared with the
retrieval benchmark, benchmarks/retrieval/).

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

import torch
from torch import Tensor, nn

from benchmarks.attention_layers import (
    BRANCHES,
    BranchGate,
    ModelShape,
    SlidingWindowAttention,
    feed_forward,
    sparse_attention,
)
from nsa_core import SparseAttention
from nsa_core.model.transformer import DenseAttention

__all__ = ["VARIANTS", "BRANCHES", "ModelShape", "ByteLanguageModel", "make_attention", "build_language_model",
           "parameter_counts", "branch_gate_means"]

VOCAB_SIZE = 256
VARIANTS = ("nsa", "dense", "window", "no_selection")


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


def make_attention(variant: str, shape: ModelShape, backend: str = "auto") -> nn.Module:
    """One attention layer of `variant` (one of VARIANTS)."""
    if variant == "nsa":
        return sparse_attention(shape, backend)
    if variant == "no_selection":
        return sparse_attention(shape, backend, strategy_combine_mlp=BranchGate(shape.dim, shape.heads, off=("selected",)))
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
