"""Optimizer parameter groups for a model holding SparseAttention layers: the compression side of every
layer (its key and value compression networks, their intra-block positions and memory tokens) at its own
fraction of the learning rate, weight decay on matrices and larger tensors only.

Training from scratch, the compression networks at a quarter of the rate kept NSA's compressed branch in use
and gave the best language model measured (benchmarks/RESULTS.md, "The learning-rate sweep"): that is the
default scale here. The groups work with any torch optimizer and scheduler: each group's "lr" is already
scaled, and "lr_scale" records the factor for a training loop that sets rates itself.
"""

from __future__ import annotations

import math

from torch import nn

from nsa_core.model.attention import SparseAttention

# SparseAttention's attributes (names as native-sparse-attention-pytorch's) that compression_lr_scale scales
COMPRESSION_ATTRIBUTES = ("k_compress", "v_compress", "k_intrablock_positions", "v_intrablock_positions",
                          "compress_mem_kv")
RECOMMENDED_COMPRESSION_LR_SCALE = 0.25


def compression_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The compression-side parameters of every SparseAttention in `model` (each once, in module order)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if not isinstance(module, SparseAttention):
            continue
        for attribute in COMPRESSION_ATTRIBUTES:
            part = getattr(module, attribute)
            for p in part.parameters() if isinstance(part, nn.Module) else (part,):
                found.setdefault(id(p), p)
    return list(found.values())


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 compression_lr_scale: float = RECOMMENDED_COMPRESSION_LR_SCALE) -> list[dict]:
    """Parameter groups for torch.optim (e.g. `torch.optim.AdamW(param_groups(model, 1e-3, 0.1))`).

    Every trainable parameter of `model` lands in exactly one group: the compression side of each
    SparseAttention (compression_parameters) at lr * compression_lr_scale, everything else at lr; weight
    decay on tensors of two or more dimensions, none on norms, biases, gates' biases and scalars. Each group
    carries "lr" (scaled) and "lr_scale" (the factor). compression_lr_scale=1 gives one rate for all.
    """
    lr = _positive("lr", lr)
    weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
    scale = _positive("compression_lr_scale", compression_lr_scale)
    compressed = {id(p) for p in compression_parameters(model)}
    grouped: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():  # each parameter once, tied ones included
        if p.requires_grad:
            grouped.setdefault((id(p) in compressed, p.ndim >= 2), []).append(p)
    groups = []
    for (is_compression, decayed), params in sorted(grouped.items()):
        factor = scale if is_compression else 1.0
        groups.append({"params": params, "lr": lr * factor, "lr_scale": factor,
                       "weight_decay": weight_decay if decayed else 0.0})
    return groups
