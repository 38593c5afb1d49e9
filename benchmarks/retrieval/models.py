"""The retrieval models: they differ only in attention; the variants are data.

Every model is: token embedding + previous-token mixing -> depth x (x + attention(x),
x + feed_forward(x)) -> RMSNorm -> logits, read only at the answer positions. The previous-token
mixing (the same for every model) adds a second embedding of the token before each position
(zero at the first), so a value token also carries its key: the test is retrieval, not the
forming of an induction head. The feed-forwards come from `seed`, the attention layers from
`seed + 1`, the embeddings and the head from `seed + 2`: every variant starts from identical
non-attention weights.

A variant (`Variant`) is an attention kind and its options:
- `dense`: nsa_core's DenseAttention (rotary, GQA, SDPA);
- `window`: NSA's sliding-window branch alone (benchmarks/attention_layers.py);
- `nsa`: SparseAttention; `branches` keeps a subset of its three branches, the others' gates
  held at exactly 0 (attention_layers.BranchGate); `all_blocks` selects every visible block
  (num_selected_blocks = target length / selection block; blocks whose selection probability
  underflows 1e-10 are still dropped by the library's validity threshold); `options` are extra
  SparseAttention keyword arguments passed straight through (e.g. `independent_kv`,
  `selection_score`, `num_forced_initial_blocks`, `gate_biases`: only the names the installed
  SparseAttention accepts). With a subset of branches the gate is BranchGate, which takes
  `gate_biases` itself.

Dimension legend: b rows, n tokens, q answers per row, v vocabulary.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
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
from nsa_core import SparseAttention
from nsa_core.model.transformer import DenseAttention

ATTENTION_KINDS = ("dense", "window", "nsa")


def _sparse_attention_keywords() -> set[str]:
    return set(inspect.signature(SparseAttention.__init__).parameters) - {"self"}


def check_nsa_options(options: dict[str, Any]) -> None:
    """Options must be SparseAttention keyword arguments the model does not already set."""
    if not isinstance(options, dict):
        raise ValueError(f"nsa options must be a JSON object, got {options!r}")
    owned = {"dim", "dim_head", "heads", "kv_heads", "causal", "sliding_window_size", "compress_block_size",
             "compress_block_sliding_stride", "selection_block_size", "num_selected_blocks",
             "compress_mlp_expand_factor", "backend", "compress_mlp", "strategy_combine_mlp"}
    accepted = _sparse_attention_keywords() - owned
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"nsa options {unknown} are not SparseAttention options this library has; "
                         f"accepted: {sorted(accepted)}")


@dataclass(frozen=True)
class Variant:
    attention: str  # one of ATTENTION_KINDS
    branches: tuple[str, ...] = BRANCHES  # nsa: the branches kept; the others' gates are held at 0
    all_blocks: bool = False  # nsa: select every visible block
    options: dict[str, Any] = field(default_factory=dict)  # nsa: extra SparseAttention keyword arguments

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if not self.branches or set(self.branches) - set(BRANCHES):
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {self.branches!r}")
        if self.attention != "nsa" and (self.branches != BRANCHES or self.all_blocks or self.options):
            raise ValueError(f"branches, all_blocks and options apply to nsa variants only, not {self.attention!r}")
        check_nsa_options(self.options)

    def to_dict(self) -> dict:
        return {"attention": self.attention, "branches": list(self.branches), "all_blocks": self.all_blocks,
                "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict) -> "Variant":
        if not isinstance(data, dict) or "attention" not in data:
            raise ValueError(f"a variant is a JSON object with at least 'attention', got {data!r}")
        unknown = sorted(set(data) - {"attention", "branches", "all_blocks", "options"})
        if unknown:
            raise ValueError(f"unknown variant keys {unknown}; allowed: attention, branches, all_blocks, options")
        return cls(data["attention"], tuple(data.get("branches", BRANCHES)), bool(data.get("all_blocks", False)),
                   dict(data.get("options", {})))


VARIANTS: dict[str, Variant] = {
    "dense": Variant("dense"),
    "window": Variant("window"),
    "nsa": Variant("nsa"),
    "nsa_compressed_only": Variant("nsa", branches=("compressed",)),
    "nsa_selected_only_all_blocks": Variant("nsa", branches=("selected",), all_blocks=True),
    "nsa_selected_only_topk": Variant("nsa", branches=("selected",)),
}
DEFAULT_MODELS = tuple(VARIANTS)


class RetrievalModel(nn.Module):
    def __init__(self, vocab_size: int, dim: int, attentions: list[nn.Module], feed_forwards: list[nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.previous_embed = nn.Embedding(vocab_size, dim)  # the previous-token mixing
        self.attentions = nn.ModuleList(attentions)
        self.feed_forwards = nn.ModuleList(feed_forwards)
        self.norm = nn.RMSNorm(dim)
        self.to_logits = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, ids: Tensor, answer_pos: Tensor) -> Tensor:
        """ids (b, n), answer_pos (b, q) -> logits (b, q, v) of the token after each answer position."""
        previous = F.pad(self.previous_embed(ids[:, :-1]), (0, 0, 1, 0))  # (b, n, dim), zero at position 0
        x = self.embed(ids) + previous
        for attention, ff in zip(self.attentions, self.feed_forwards):
            x = x + attention(x)
            x = x + ff(x)
        picked = x.gather(1, answer_pos[..., None].expand(-1, -1, x.shape[-1]))  # (b, q, dim)
        return self.to_logits(self.norm(picked))


def make_attention(variant: Variant, shape: ModelShape, target_length: int, backend: str) -> nn.Module:
    if variant.attention == "dense":
        return DenseAttention(shape.dim, dim_head=shape.dim_head, heads=shape.heads, kv_heads=shape.kv_heads, causal=True)
    if variant.attention == "window":
        return SlidingWindowAttention(shape.dim, shape.dim_head, shape.heads, shape.kv_heads, shape.window, backend)
    options = dict(variant.options)
    if variant.all_blocks:
        shape = replace(shape, num_selected=max(1, target_length // shape.selection_block))
    if variant.branches != BRANCHES:
        biases = tuple(options.pop("gate_biases", INITIAL_GATE_BIASES))
        off = tuple(b for b in BRANCHES if b not in variant.branches)
        options["strategy_combine_mlp"] = BranchGate(shape.dim, shape.heads, off=off, biases=biases)
    return sparse_attention(shape, backend, **options)


def build_model(variant: Variant, shape: ModelShape, vocab_size: int, target_length: int, seed: int,
                backend: str = "auto") -> RetrievalModel:
    """A fresh model of `variant` for rows of up to `target_length` tokens (see the module docstring
    for the seeds)."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # NSAConfig's note on tiny ablation settings
        torch.manual_seed(seed)
        feed_forwards = [feed_forward(shape.dim, shape.ff_mult) for _ in range(shape.depth)]
        torch.manual_seed(seed + 1)
        attentions = [make_attention(variant, shape, target_length, backend) for _ in range(shape.depth)]
        torch.manual_seed(seed + 2)
        return RetrievalModel(vocab_size, shape.dim, attentions, feed_forwards)


def sparse_layers(model: RetrievalModel) -> list[SparseAttention]:
    return [a for a in model.attentions if isinstance(a, SparseAttention)]
