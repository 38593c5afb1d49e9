"""Input checks shared by the functional ops: each error names the argument and the rule."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_heads_tensor(name: str, t) -> None:
    """A floating torch.Tensor of 4 dims (batch, heads, seq, head_dim)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 4:
        raise ValueError(f"{name} must have 4 dims (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {t.dtype}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, same_length: bool = True) -> None:
    """q (B, HQ, T, D), k (B, HKV, S, D), v (B, HKV, S, Dv); S == T unless same_length=False."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_heads_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, HQ, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if (same_length and k.shape[2] != T) or v.shape[2] != k.shape[2]:
        raise ValueError(f"q, k, v must share the sequence length, got {T}, {k.shape[2]}, {v.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"k head dim must equal q head dim ({D}), got {k.shape[3]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have as many heads as k ({k.shape[1]}), got {v.shape[1]}")
    if HQ % k.shape[1] != 0:
        raise ValueError(f"query heads ({HQ}) must be a multiple of kv heads ({k.shape[1]})")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_same_device_dtype(**tensors: Tensor) -> None:
    """Every tensor a floating torch.Tensor, all on one device with one dtype."""
    for name, t in tensors.items():
        check_heads_tensor(name, t)
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{name} must share {first_name}'s dtype and device ({first.dtype}, {first.device}), "
                             f"got {t.dtype}, {t.device}")
