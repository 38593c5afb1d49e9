"""What the NSA layers do while they learn (or fail to): the selection hit rate, the branch gates
and the gradient norms of the compression networks and of the q/k/v projection.

- Hit rate, per NSA layer: the fraction of (answer, selection head) pairs whose valid selected
  blocks include the block of the answer's support token (the needle's value, the queried key's
  value), from `SparseAttention.select` on the layer's own input (captured by a forward pre-hook).
  Random baseline: valid selected blocks / blocks the query may select, the blocks before its
  own (answer position // selection block), averaged the same way: what a uniformly random
  choice of as many blocks would hit.
- Gates, per NSA layer and branch: the mean sigmoid gate over every position, and at the answer
  positions (read by a forward hook on `to_strategy_combine`, output (b, h, n, 3)).
- Gradient norms, per attention layer: the L2 norm of the gradients of k_compress, v_compress,
  the intra-block positions and the q/k/v projection (DenseAttention's to_q, to_k, to_v), summed
  on the device every step and averaged between evaluations (no host sync in the step).

Dimension legend: b rows, H selection heads, n tokens, q answers per row, S selected slots.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from benchmarks.attention_layers import BRANCHES
from benchmarks.retrieval.tasks import Batch
from nsa_core import SparseAttention

GRAD_GROUPS = ("k_compress", "v_compress", "intrablock_positions", "to_qkv")


def selection_hits(indices: Tensor, valid: Tensor, batch: Batch, selection_block: int) -> tuple[Tensor, Tensor]:
    """indices / valid (b, H, n, S) of a layer's selection -> (hits, baseline) (b, H, q) floats:
    1 where an answer's support block is among its valid selected blocks, and the share of the
    blocks before the answer's own that were selected."""
    H, S = indices.shape[1], indices.shape[-1]
    at = batch.answer_pos[:, None, :, None].expand(-1, H, -1, S)
    picked, picked_valid = indices.gather(2, at), valid.gather(2, at)  # (b, H, q, S)
    support_block = (batch.support_pos // selection_block)[:, None, :, None]
    hits = ((picked == support_block) & picked_valid).any(dim=-1).float()
    visible = (batch.answer_pos // selection_block).clamp(min=1)[:, None, :]
    baseline = picked_valid.sum(dim=-1).float() / visible
    return hits, baseline


@contextmanager
def capture_layers(layers: list[SparseAttention]):
    """While inside: `inputs[i]` lists layer i's inputs, `gates[i]` its gates (b, h, n, 3), one per forward."""
    inputs: list[list[Tensor]] = [[] for _ in layers]
    gates: list[list[Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0].detach())))
        hooks.append(layer.to_strategy_combine.register_forward_hook(
            lambda _m, _args, out, i=i: gates[i].append(out.detach())))
    try:
        yield inputs, gates
    finally:
        for hook in hooks:
            hook.remove()


class LayerProbe:
    """Sums of hit rates and gates over the evaluation batches of one evaluation, on the device."""

    def __init__(self, layers: list[SparseAttention], device: torch.device):
        self.layers = layers
        n = len(layers)
        self.hits, self.baseline = torch.zeros(n, device=device), torch.zeros(n, device=device)
        self.gate_all, self.gate_answer = torch.zeros(n, 3, device=device), torch.zeros(n, 3, device=device)
        self.batches = 0

    def add(self, inputs: list[Tensor], gates: list[Tensor], batch: Batch) -> None:
        """One evaluation batch: each layer's input (b, n, dim) and gates (b, h, n, 3)."""
        for i, (layer, x, gate) in enumerate(zip(self.layers, inputs, gates)):
            selection = layer.select(x)
            if selection is not None:
                hits, baseline = selection_hits(selection.indices, selection.valid, batch,
                                                layer.config.selection_block_size)
                self.hits[i] += hits.mean()
                self.baseline[i] += baseline.mean()
            self.gate_all[i] += gate.float().mean(dim=(0, 1, 2))
            at = batch.answer_pos[:, None, :, None].expand(-1, gate.shape[1], -1, gate.shape[-1])
            self.gate_answer[i] += gate.gather(2, at).float().mean(dim=(0, 1, 2))
        self.batches += 1

    def result(self) -> dict:
        """Per layer: hit rate, its random baseline, mean gates (all positions, answer positions)."""
        if not self.layers or self.batches == 0:
            return {}
        k = self.batches
        return {
            "hit_rate": [round(v, 4) for v in (self.hits / k).tolist()],
            "hit_rate_random": [round(v, 4) for v in (self.baseline / k).tolist()],
            "gates": [dict(zip(BRANCHES, (round(v, 4) for v in row))) for row in (self.gate_all / k).tolist()],
            "gates_at_answers": [dict(zip(BRANCHES, (round(v, 4) for v in row))) for row in (self.gate_answer / k).tolist()],
        }


def gradient_groups(layer: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters of GRAD_GROUPS that `layer` has (SparseAttention, the window module, DenseAttention)."""
    def params(*names: str) -> list[nn.Parameter]:
        found = []
        for name in names:
            part = getattr(layer, name, None)
            if isinstance(part, nn.Parameter):
                found.append(part)
            elif isinstance(part, nn.Module):
                found += list(part.parameters())
        return found

    groups = {"k_compress": params("k_compress"), "v_compress": params("v_compress"),
              "intrablock_positions": params("k_intrablock_positions", "v_intrablock_positions"),
              "to_qkv": params("to_qkv") or params("to_q", "to_k", "to_v")}
    return {name: ps for name, ps in groups.items() if ps}


class GradientNorms:
    """Per layer and group, the L2 gradient norm summed over steps on the device; `result`
    averages since the last call (and resets)."""

    def __init__(self, layers: list[nn.Module], device: torch.device):
        self.groups = [gradient_groups(layer) for layer in layers]
        self.sums = [{name: torch.zeros((), device=device) for name in groups} for groups in self.groups]
        self.steps = 0

    @torch.no_grad()
    def add(self) -> None:
        for groups, sums in zip(self.groups, self.sums):
            for name, ps in groups.items():
                grads = [p.grad for p in ps if p.grad is not None]
                if grads:
                    sums[name] += torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        self.steps += 1

    def result(self) -> list[dict[str, float]] | None:
        if self.steps == 0 or not any(self.groups):
            return None
        out = [{name: round(float(total) / self.steps, 6) for name, total in sums.items()} for sums in self.sums]
        for sums in self.sums:
            for total in sums.values():
                total.zero_()
        self.steps = 0
        return out
