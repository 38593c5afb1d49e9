"""Where every kernel output is allocated: tests replace `new_output` to poison outputs with NaN
(an element a kernel forgets to write then fails the test)."""

from __future__ import annotations

import torch


def new_output(*shape, device, dtype) -> torch.Tensor:
    return torch.empty(*shape, device=device, dtype=dtype)
