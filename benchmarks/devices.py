"""The device and precision a benchmark runs on, from its settings' "auto" / named choices."""

from __future__ import annotations

import torch


def resolve_device(device: str, precision: str) -> tuple[torch.device, str]:
    """device "auto" (CUDA when there is one) or a name; precision "auto" (bf16 on CUDA, fp32
    elsewhere) or a name. A ValueError when CUDA is asked for and absent."""
    chosen = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be available: {device!r} was asked for and CUDA is not available")
    return chosen, precision if precision != "auto" else ("bf16" if chosen.type == "cuda" else "fp32")
