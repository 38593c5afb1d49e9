"""The four byte-level language models of the comparison; they differ only in their attention.

- `dense`: full causal attention (`DenseAttention`: rotary, GQA, flash SDPA), per document.
- `window`: NSA's sliding-window branch alone (`SlidingWindowAttention`).
- `nsa`: `SparseAttention` with `nsa_options` (the recommended `paper_scratch` options by default).
- `no_selection`: the same `SparseAttention` with its selected branch's gate held at exactly 0
  (`BranchGate`): compression + window. The branch is still computed and discarded, so its tokens/s
  is no speed figure for a compression + window design.

Every model: byte embedding -> depth x (x + attention(x), x + feed_forward(x)) -> RMSNorm -> logits
over 256 bytes, on packed documents (`cu_seqlens`, batch 1). The feed-forwards, the embedding and
the head come from the same seeds for every variant (the attention from a third), so two variants
start from identical non-attention weights. The gates start from `gate_biases` of the options
(the window model's single gate from its sliding bias).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.attention_layers import (
    BRANCHES,
    INITIAL_GATE_BIASES,
    BranchGate,
    ModelShape,
    SlidingWindowAttention,
    feed_forward,
    sparse_attention,
)
from benchmarks.quality_models import ByteLanguageModel
from nsa_core.model.dense import DenseAttention

VARIANTS = ("dense", "window", "nsa", "no_selection")


class PackedByteLM(ByteLanguageModel):
    """The quality comparison's byte model (quality_models.ByteLanguageModel) on packed documents."""

    def forward(self, ids: Tensor, cu_seqlens: Tensor) -> Tensor:
        """ids (1, total) of packed documents -> logits (1, total, 256) for the next byte."""
        x = self.embed(ids)
        for attention, ff in zip(self.attentions, self.feed_forwards):
            x = x + attention(x, cu_seqlens=cu_seqlens)
            x = x + ff(x)
        return self.to_logits(self.norm(x))


def gate_biases(options: dict[str, Any]) -> tuple[float, float, float]:
    biases = options.get("gate_biases", INITIAL_GATE_BIASES)
    if len(biases) != len(BRANCHES):
        raise ValueError(f"nsa_options gate_biases must hold one value per branch {BRANCHES}, got {biases!r}")
    return tuple(float(b) for b in biases)


def make_attention(variant: str, shape: ModelShape, options: dict[str, Any], backend: str) -> nn.Module:
    if variant == "dense":
        return DenseAttention(shape.dim, dim_head=shape.dim_head, heads=shape.heads, kv_heads=shape.kv_heads, causal=True)
    if variant == "window":
        return SlidingWindowAttention(shape.dim, shape.dim_head, shape.heads, shape.kv_heads, shape.window, backend,
                                      gate_bias=gate_biases(options)[BRANCHES.index("sliding")])
    if variant == "nsa":
        return sparse_attention(shape, backend, **options)
    if variant == "no_selection":
        rest = {k: v for k, v in options.items() if k != "gate_biases"}  # the gate module carries them
        gate = BranchGate(shape.dim, shape.heads, off=("selected",), biases=gate_biases(options))
        return sparse_attention(shape, backend, strategy_combine_mlp=gate, **rest)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def build_model(variant: str, shape: ModelShape, seed: int, options: dict[str, Any], backend: str = "auto") -> PackedByteLM:
    """A fresh model: feed-forwards from `seed`, attention from `seed + 1`, embedding and head from
    `seed + 2`."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # NSAConfig's note on tiny ablation settings
        torch.manual_seed(seed)
        feed_forwards = [feed_forward(shape.dim, shape.ff_mult) for _ in range(shape.depth)]
        torch.manual_seed(seed + 1)
        attentions = [make_attention(variant, shape, options, backend) for _ in range(shape.depth)]
        torch.manual_seed(seed + 2)
        return PackedByteLM(shape.dim, attentions, feed_forwards)


def parameter_counts(model: PackedByteLM) -> dict[str, int]:
    return {"params": sum(p.numel() for p in model.parameters()),
            "attention_params": sum(p.numel() for p in model.attentions.parameters())}
