"""Which pass a forward runs, and the arguments that exclude each other: one rule for SparseAttention,
DenseAttention and the Transformer.

- "sharded": a sequence_parallel_group was given (this rank's shard of one sequence; no cache, no
  lengths, no packed documents);
- "cached": a cache was given or asked for (causal modules only; whole sequences, no packed documents);
- "parallel": the whole input at once (packed documents allowed, `packed_seqs` describes them;
  `lengths` describes a prompt for a cache and is refused here).
"""

from __future__ import annotations

from torch import Tensor

from nsa_core.distributed.sequence_parallel import resolve_layout
from nsa_core.seqs import Seqs

SHARDED, CACHED, PARALLEL = "sharded", "cached", "parallel"


def forward_mode(*, cache, return_cache: bool, lengths, cu_seqlens, causal: bool, group=None,
                 layout: str | None = None) -> str:
    """SHARDED, CACHED or PARALLEL for these forward arguments; a ValueError naming the arguments that
    do not go together (layout: forward's sequence_parallel_layout, None for the default)."""
    resolve_layout(layout, group)
    cached = cache is not None or return_cache
    if group is not None:
        if cached or lengths is not None or cu_seqlens is not None:
            raise ValueError("sequence_parallel_group runs the parallel pass over one sequence: it takes no cache, "
                             "return_cache, lengths or cu_seqlens")
        return SHARDED
    if cached:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens packs documents for the parallel pass; a cache holds whole sequences")
        if not causal:
            raise ValueError("cache / return_cache need a causal module (causal=True)")
        return CACHED
    if lengths is not None:
        raise ValueError("lengths describes a prompt for a cache: pass cache= or return_cache=True with it")
    return PARALLEL


def packed_seqs(cu_seqlens: Tensor | None, inp: Tensor) -> Seqs | None:
    """The descriptor of `forward(inp, cu_seqlens=...)`: None without packing, else the validated
    packed documents of inp (1, total, ...)."""
    if cu_seqlens is None:
        return None
    if inp.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs documents into one row: input must have batch 1, got {inp.shape[0]}")
    return Seqs.packed(cu_seqlens, inp.shape[1], device=inp.device)
