"""What the attention kernels accept, shared by every launcher: dtypes, head dims, block sizes."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_BLOCK_SIZE = 128


def dtype_reason(t: torch.Tensor) -> str | None:
    if t.dtype not in KERNEL_DTYPES:
        return f"kernels take float16, bfloat16 or float32, got {t.dtype}"
    return None


def head_dim_reason(d: int, dv: int) -> str | None:
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        return f"kernels take head dims up to {MAX_HEAD_DIM}, got D={d}, Dv={dv}"
    return None
