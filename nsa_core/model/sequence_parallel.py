"""The sequence-parallel pass of SparseAttention: this rank's shard of the sequence in, its shard of
the output out (shard layouts and collectives: nsa_core/distributed).

A rank:
1. norms and projects its own shard: q (its queries only), k and v (its tokens only);
2. all-gathers the unrotated keys and values of the whole sequence (one collective per layer, with
   autograd: the backward pass reduce-scatters the key / value gradients back to their owners) and,
   balanced, puts the gathered chunks in sequence order (one concatenation of views; autograd hands
   the reduce-scatter each rank's gradient in its shard's order);
3. builds the branches' keys from the gathered sequence exactly as one device does (compression of
   all n / stride windows with the replicated compression networks, so windows that straddle shard
   boundaries need nothing special; rotary on every key);
4. runs `SparseAttention.attend` for each contiguous piece of its queries (contiguous: one, balanced:
   two), described by the sequence descriptor `Seqs(q_len=piece, k_len=n, q_offset=piece start)`:
   the ops see a piece as queries after other keys.
The shards of the outputs put back in sequence order (`unshard_sequence`) equal the single-device
output; each rank's input gradient is its shard of the single-device input gradient; parameter
gradients summed over the ranks (the reduction of FSDP / DDP, which average: see the README) equal
the single-device gradients.

Why all-gather of keys and values rather than Ulysses' all-to-all over heads: with GQA the keys and
values are small (2 * kv_heads / heads of q, k, v and the output: 1/17 at the paper's 64 / 4 heads),
any P works (Ulysses needs P <= kv heads or replicated kv heads), and the selected blocks of a query
may sit anywhere before it, so a rank needs every key anyway. A rank receives about 2 * n * hk * d
elements per layer whatever P, Ulysses about (2 h + 2 hk) * n * d / P: less traffic up to P ~ 17 at
64 / 4 heads. benchmarks/NOTES.md has the numbers.

Dimension legend: b batch, n whole sequence, nl = n / P tokens of a shard, h query heads, hk kv heads,
d head dim, P ranks of the group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from nsa_core.distributed.sequence_parallel import (
    check_group,
    check_layout,
    check_shard_shapes,
    gather_sequence,
    shard_spans,
)
from nsa_core.seqs import Seqs

if TYPE_CHECKING:
    from nsa_core.model.attention import SparseAttention


def shard_seqs(seq_len: int, world: int, rank: int, layout: str = "contiguous") -> list[Seqs]:
    """The descriptors of rank `rank`'s pieces of queries among the seq_len gathered keys, in its
    shard's order (contiguous: one piece, balanced: two)."""
    return [Seqs(q_len=e - s, k_len=seq_len, q_offset=s) for s, e in shard_spans(seq_len, world, rank, layout)]


def sequence_parallel_forward(module: SparseAttention, inp: Tensor, group, layout: str = "contiguous") -> Tensor:
    """SparseAttention's forward for this rank's shard inp (b, nl, dim) -> its shard of the output (b, nl, dim)."""
    check_layout(layout)
    check_group(group, inp)
    check_shard_shapes(inp, group)  # every rank the same shard length: the checks below agree on all ranks
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    seqs = shard_seqs(inp.shape[1] * world, world, rank, layout)
    return shard_forward(module, inp, lambda kv: gather_sequence(kv, group, layout), seqs)


def shard_forward(module: SparseAttention, inp: Tensor, gather: Callable[[Tensor], Tensor],
                  seqs: Seqs | Sequence[Seqs]) -> Tensor:
    """One rank's computation: `gather` maps this shard's stacked keys and values (2, b, hk, nl, d) to
    the whole sequence's (2, b, hk, n, d) in sequence order (the collective; benchmarks pass a
    stand-in to time one rank's compute on one GPU); `seqs` places the shard's queries among the n
    keys: one descriptor, or one per contiguous piece of the shard in its order (their q_len summing
    to nl; `shard_seqs` makes them). The keys are built once; `attend` runs once per piece."""
    pieces = [seqs] if isinstance(seqs, Seqs) else list(seqs)
    if sum(s.q_len for s in pieces) != inp.shape[1]:
        raise ValueError(f"the pieces' descriptors hold {sum(s.q_len for s in pieces)} queries, "
                         f"the shard {inp.shape[1]} tokens")
    x = module.norm(inp)
    q, k, v = module.project(x)  # q (b, h, nl, d), k / v (b, hk, nl, d)
    kv = gather(torch.stack((k, v)))  # (2, b, hk, n, d): one collective for both
    keys = module.keys_of(kv[0], kv[1])
    if len(pieces) == 1:
        return module.attend(x, q, keys, pieces[0])
    outs, start = [], 0
    for piece in pieces:
        end = start + piece.q_len
        outs.append(module.attend(x[:, start:end], q[:, :, start:end], keys, piece))
        start = end
    return torch.cat(outs, dim=1)


def shard_gaps(spans: list[tuple[int, int]], seq_len: int) -> list[tuple[int, int]]:
    """The token ranges a rank does not hold: before, between and after its ascending `spans`
    (len(spans) + 1 ranges, some possibly empty)."""
    edges = [0, *[t for span in spans for t in span], seq_len]
    return list(zip(edges[0::2], edges[1::2]))


def place_shard(shard: Tensor, spans: list[tuple[int, int]], others: Sequence[Tensor], dim: int = -2) -> Tensor:
    """A rank's shard (its spans' tokens along `dim`, in shard order) put between `others`, the
    tokens of its gaps (one tensor per range of `shard_gaps`) -> the whole sequence: a stand-in for
    the all-gather with which one device runs one rank's computation (benchmarks, tests)."""
    pieces = shard.split([e - s for s, e in spans], dim=dim)
    return torch.cat([t for pair in zip(others, pieces) for t in pair] + [others[-1]], dim=dim)
