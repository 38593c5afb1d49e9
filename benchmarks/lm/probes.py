"""The branch gates of the NSA models during validation: how much weight each branch (compressed,
selected, sliding) gets, per layer and by the token's position in its document.

A model uses long context through its compressed and selected branches only if it weights them;
the mean gate by position bucket shows whether it weights them more where there is more to reach.
Hooks read the output of every `SparseAttention.to_strategy_combine` (the sigmoid gates,
(b, h, n, 3)); models without one (dense, window) give no record.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from benchmarks.attention_layers import BRANCHES


class GateProbe:
    """Sums of the gates per (layer, bucket, branch) over the forwards inside `recording(positions)`."""

    def __init__(self, model: nn.Module, edges: tuple[int, ...]):
        self.gate_modules = [m.to_strategy_combine for m in model.attentions if hasattr(m, "to_strategy_combine")]
        self.edges = edges
        self.sums = torch.zeros(len(self.gate_modules), len(edges) - 1, len(BRANCHES), dtype=torch.float64)
        self.counts = torch.zeros(len(edges) - 1, dtype=torch.float64)

    @property
    def active(self) -> bool:
        return bool(self.gate_modules)

    @contextmanager
    def recording(self, positions: Tensor):
        """Record the gates of the forwards inside; `positions` (n,): each packed token's position in
        its document (the order of the model's packed sequence)."""
        buckets = torch.bucketize(positions, torch.tensor(self.edges[1:-1]), right=True)
        inside = positions < self.edges[-1]
        one_hot = torch.zeros(len(positions), len(self.edges) - 1, dtype=torch.float64)
        one_hot[inside.nonzero().flatten(), buckets[inside]] = 1.0

        def hook_for(layer: int):
            def hook(module, args, gates: Tensor) -> None:
                # gates (b, h, n, 3) -> per token the mean over batch and heads, (n, 3)
                per_token = gates.detach().float().mean(dim=(0, 1)).double().cpu()
                self.sums[layer] += one_hot.T @ per_token
            return hook

        handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(self.gate_modules)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.counts += one_hot.sum(0)

    def summary(self) -> dict | None:
        """{"mean": {branch: gate over layers and positions}, "by_bucket": {bucket: {branch: gate}},
        "per_layer": [{branch: gate}]}; None for a model without gates or before any record."""
        if not self.active or self.counts.sum() == 0:
            return None
        total = self.counts.sum()
        names = [f"{a}-{b}" for a, b in zip(self.edges, self.edges[1:])]  # as evaluation.bucket_names

        def by_branch(values: Tensor) -> dict:
            return {b: round(float(v), 4) for b, v in zip(BRANCHES, values)}

        by_bucket = {n: by_branch(self.sums[:, i].mean(0) / c) for i, (n, c) in enumerate(zip(names, self.counts)) if c}
        return {"mean": by_branch(self.sums.sum(1).mean(0) / total), "by_bucket": by_bucket,
                "per_layer": [by_branch(layer.sum(0) / total) for layer in self.sums]}


@contextmanager
def branch_switched_off(model: nn.Module, branch: str):
    """Inside: every SparseAttention layer's gate of `branch` held at 0 (its output dropped from the
    combine), to measure by position what the trained model draws from that branch."""
    index = BRANCHES.index(branch)

    def hook(module, args, gates: Tensor) -> Tensor:
        gates = gates.clone()
        gates[..., index] = 0
        return gates

    handles = [m.to_strategy_combine.register_forward_hook(hook) for m in model.attentions
               if hasattr(m, "to_strategy_combine")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
