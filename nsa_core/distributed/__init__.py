"""Sequence parallelism's shard layouts and collectives over torch.distributed (no module: the pass is
model/sequence_parallel.py).

Public: the shard layouts (LAYOUTS: "contiguous", "balanced"; DEFAULT_LAYOUT "balanced"), `shard_sequence` (this rank's shard of
a whole tensor), `unshard_sequence` (the whole sequence from every rank's shard), `shard_spans` (the
token ranges a rank holds) and `gather_sequence` (the all-gather with autograd, in sequence order).
"""

from nsa_core.distributed.sequence_parallel import (
    DEFAULT_LAYOUT,
    LAYOUTS,
    gather_sequence,
    shard_sequence,
    shard_spans,
    unshard_sequence,
)

__all__ = ["DEFAULT_LAYOUT", "LAYOUTS", "gather_sequence", "shard_sequence", "shard_spans", "unshard_sequence"]
