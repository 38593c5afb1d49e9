"""Packed documents on the reference path: run a function on every document alone and put the
results back in token order (`per_document` over token ranges; `each_sequence`, the ops' one shape
of it: the same call on a whole batch, or on every packed document cut out of its tensors). The
twin of the kernels' packed layouts (which take all documents in one launch); it reads the
document bounds on the host once per call.

Compressed tokens of packed documents (model/compression.py): document i's j-th compressed token
sits at slot cu_seqlens[i] // stride + j of the (T // stride) slots; slots no document owns (at
most one per document) hold junk that no query sees.

Dimension legend: T tokens of the packed row (dim -2 of every token-major tensor), N documents.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from nsa_core.selection import Selection
from nsa_core.seqs import Seqs

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


def _cut(t, start: int, end: int):
    """Tokens start ... end - 1 (dim 2) of a head-major tensor (b, h, T, ...) or a Selection; None stays None."""
    if t is None:
        return None
    if isinstance(t, Selection):
        return Selection(*(_cut(f, start, end) for f in (t.indices, t.valid, t.probs, t.gates)))
    return t[:, :, start:end]


def each_sequence(fn: Callable[..., Tensor], seqs: Seqs, *tokens) -> Tensor:
    """fn(*tokens, seqs) when seqs packs no documents; for packed documents fn(*cut, Seqs.batch(n)) of
    every document alone, `cut` each of `tokens` (head-major tensors (b, h, T, ...), Selections or
    None) at its n tokens, the results back in token order (per_document: reads the bounds on the host)."""
    if not seqs.is_packed:
        return fn(*tokens, seqs)
    return per_document(lambda s, e: fn(*(_cut(t, s, e) for t in tokens), Seqs.batch(e - s)), seqs.spans())
