"""CombineGates: the gates of the three branches' combine, handed to an op before they are computed, so a
fused decoding step (ops/selected_window_combine.py) can compute them inside its combine launch where they are
sigmoid(linear(x)); every other call takes `tensor()`, the gate network's own output.

Dimension legend: b batch, n tokens, h query heads, s branches (3: compressed, selected, window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor


@dataclass(frozen=True)
class CombineGates:
    """Gates of the normed input x (b, n, dim): network(x) -> (b, h, n, 3). `weight` (3h, dim) and `bias`
    (3h,) or None are given only where network(x) is sigmoid(x @ weight.T + bias) with row h * 3 + s head
    h's gate of branch s and nothing else may see the call (no hooks): a kernel may then compute them."""

    x: Tensor
    network: Callable[[Tensor], Tensor]
    weight: Tensor | None = None
    bias: Tensor | None = None

    def tensor(self) -> Tensor:
        """The gates (b, h, n, 3), from the network."""
        return self.network(self.x)
