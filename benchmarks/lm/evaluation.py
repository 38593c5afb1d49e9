"""Validation of the language-model comparison: bits per byte over the scored labels, by position in
the document (the context the model had), and with documents cut every `capped_context` tokens (the
same labels with at most that much context): a model that uses long context loses by the cut."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.lm.corpus import IGNORE, pack
from benchmarks.attention_layers import BRANCHES
from benchmarks.lm.probes import GateProbe, branch_switched_off
from benchmarks.quality_training import autocast

NATS_TO_BITS = 1 / math.log(2)


def bucket_names(edges: tuple[int, ...]) -> list[str]:
    return [f"{a}-{b}" for a, b in zip(edges, edges[1:])]


def token_losses(model: nn.Module, rows: Tensor, device: torch.device, precision: str,
                 cap: int | None = None, probe: GateProbe | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """rows (B, n + 1) -> per-label loss in nats (B * n,), scored mask, positions (without the cap);
    `probe` records the branch gates of this forward."""
    full = pack(rows)
    batch = pack(rows, cap) if cap is not None else full
    recording = probe.recording(batch.positions.flatten()) if probe is not None else nullcontext()
    with torch.no_grad(), autocast(device, precision), recording:
        logits = model(batch.inputs.to(device), batch.cu_seqlens.to(device))
    labels = batch.labels.to(device).flatten()
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE, reduction="none")
    return losses.cpu(), labels.cpu() != IGNORE, full.positions.flatten()


def summarize_losses(losses: Tensor, scored: Tensor, positions: Tensor, edges: tuple[int, ...]) -> dict:
    """{"bpb": overall, "buckets": {name: bpb or None}, "bucket_labels": {name: count}}."""
    out = {"bpb": float(losses[scored].double().mean()) * NATS_TO_BITS, "buckets": {}, "bucket_labels": {}}
    for name, low, high in zip(bucket_names(edges), edges, edges[1:]):
        chosen = scored & (positions >= low) & (positions < high)
        count = int(chosen.sum())
        out["buckets"][name] = float(losses[chosen].double().mean()) * NATS_TO_BITS if count else None
        out["bucket_labels"][name] = count
    return out


def evaluate(model: nn.Module, rows: Tensor, batch: int, edges: tuple[int, ...], cap: int, device: torch.device,
             precision: str, capped: bool = True) -> dict:
    """Validation over `rows` (V, n + 1), `batch` rows per forward: the full-context summary and,
    with `capped`, the capped one and the difference per bucket (capped - full, bits per byte);
    "gates": the full-context pass's branch gates (probes.GateProbe) for models that have them, and
    with `capped` for those models "branch_off_minus_full": the loss per bucket with each branch's gate
    held at 0, minus the full pass's."""
    model.eval()
    parts = {"full": [], "capped": [], **{f"without_{b}": [] for b in BRANCHES}}
    probe = GateProbe(model, edges)
    for chunk in rows.split(batch):
        parts["full"].append(token_losses(model, chunk, device, precision, probe=probe if probe.active else None))
        if capped:
            parts["capped"].append(token_losses(model, chunk, device, precision, cap))
        if capped and probe.active:
            for branch in BRANCHES:
                with branch_switched_off(model, branch):
                    parts[f"without_{branch}"].append(token_losses(model, chunk, device, precision))
    model.train()
    joined = {kind: [torch.cat(column) for column in zip(*p)] for kind, p in parts.items() if p}
    result = {"full": summarize_losses(*joined["full"], edges), "gates": probe.summary()}
    if capped:
        result["capped"] = summarize_losses(*joined["capped"], edges)
        result["capped_context"] = cap
        result["capped_minus_full"] = {
            name: (c - f if c is not None and f is not None else None)
            for (name, f), c in zip(result["full"]["buckets"].items(), result["capped"]["buckets"].values())
        }
    if capped and probe.active:
        # bits per byte lost per bucket when one branch's gate is held at 0 (the trained model unchanged)
        result["branch_off_minus_full"] = {
            branch: {name: (o - f if o is not None and f is not None else None)
                     for (name, f), o in zip(result["full"]["buckets"].items(),
                                             summarize_losses(*joined[f"without_{branch}"], edges)["buckets"].values())}
            for branch in BRANCHES
        }
    return result
