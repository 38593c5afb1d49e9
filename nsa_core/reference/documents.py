"""Packed documents on the reference path: run a function on every document alone and put the
results back in token order. The twin of the kernels' packed layouts (which take all documents in
one launch); it reads the document bounds on the host once per call.

Compressed tokens of packed documents (model/compression.py): document i's j-th compressed token
sits at slot cu_seqlens[i] // stride + j of the (T // stride) slots; slots no document owns (at
most one per document) hold junk that no query sees.

Dimension legend: T tokens of the packed row (dim -2 of every token-major tensor), N documents.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Spans = list[tuple[int, int]]


def compressed_span(start: int, end: int, stride: int) -> tuple[int, int]:
    """The compressed slots [first, last) of the document at tokens [start, end)."""
    first = start // stride
    return first, first + (end - start) // stride


def per_document(fn: Callable[[int, int], Tensor | tuple], spans: Spans) -> Tensor | tuple:
    """Concatenate fn(start, end) over the non-empty documents along dim -2 (element-wise for
    tuples, None entries stay None); a single document spanning everything is one plain call."""
    parts = [fn(start, end) for start, end in spans if end > start]
    if isinstance(parts[0], Tensor):
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
    return tuple(
        None if first is None else (first if len(parts) == 1 else torch.cat([p[i] for p in parts], dim=-2))
        for i, first in enumerate(parts[0])
    )
