"""The sequence-parallel pass of SparseAttention: this rank's shard of the sequence in, its shard of
the output out (shard layouts, collectives and the arithmetic of what a rank owns: nsa_core/distributed).

A rank does O(n / P) work of its own and reads the keys it attends; nothing O(n) is repeated on
every rank:
1. it norms and projects its own shard: q (its queries only), k and v (its tokens only);
2. compression: it compresses only the windows whose last token it holds. A window reaches back
   block - stride tokens (plus the stride remainder) into the previous chunk, so first every rank
   all-gathers the last `plan.halo` unrotated compression keys / values of each of its chunks (a few
   tokens); then the compressed tokens of all ranks are all-gathered (n / stride tokens, padded to
   the same count per chunk and put in order by one index);
3. rotary only on its own keys; the rotated keys and values of the selected and window branches are
   all-gathered (one collective for all of them);
4. `SparseAttention.attend` runs for each contiguous piece of its queries (contiguous: one,
   balanced: two), described by `Seqs(q_len=piece, k_len=n, q_offset=piece start)`; causal, the
   piece's keys end at its last query (k_len = piece end): nothing after it is visible, and the
   kernels' key grids (the backward's dK / dV) then cover only those keys.
Every all-gather has autograd: its backward reduce-scatters the gradients of the gathered tensor
back to the owners (distributed/sequence_parallel.py), so the halo's, the compressed tokens' and the
keys' gradients reach the rank that computed them.
The shards of the outputs put back in sequence order (`unshard_sequence`) equal the single-device
output; each rank's input gradient is its shard of the single-device input gradient; parameter
gradients summed over the ranks (the reduction of FSDP / DDP, which average: see the README) equal
the single-device gradients.

Why all-gather of keys and values rather than Ulysses' all-to-all over heads: with GQA the keys and
values are small (2 * kv_heads / heads of q, k, v and the output: 1/17 at the paper's 64 / 4 heads),
any P works (Ulysses needs P <= kv heads or replicated kv heads), and the selected blocks of a query
may sit anywhere before it, so a rank needs every key anyway. A rank receives about 2 * n * hk * d
elements per layer whatever P (plus n / stride compressed tokens), Ulysses about
(2 h + 2 hk) * n * d / P: less traffic up to P ~ 17 at 64 / 4 heads. benchmarks/NOTES.md has the numbers.

`shard_forward` takes the all-gather as an argument: `gather(t)` maps this rank's chunk-structured
rows (..., pieces * R, d) to every chunk's (..., chunks * R, d) in sequence order. `StandInGather`
is its one-device stand-in (benchmarks and tests: the other ranks' rows are leaf tensors).

Dimension legend: b batch, n whole sequence, nl = n / P tokens of a shard, h query heads, hk kv heads,
d head dim, P ranks of the group, R rows per chunk, c compressed tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from nsa_core.distributed.sequence_parallel import (
    after,
    check_group,
    check_layout,
    check_shard_shapes,
    gather_sequence,
)
from nsa_core.distributed.shard_plan import ShardPlan
from nsa_core.model.branch_keys import BranchKeys
from nsa_core.model.compression import with_memory
from nsa_core.seqs import Seqs

if TYPE_CHECKING:
    from nsa_core.model.attention import SparseAttention


def shard_plan(module: SparseAttention, seq_len: int, world: int, rank: int, layout: str) -> ShardPlan:
    cfg = module.config
    return ShardPlan(seq_len, world, rank, layout, cfg.compress_block_size, cfg.stride)


def shard_seqs(plan: ShardPlan) -> list[Seqs]:
    """The descriptors of the rank's pieces of queries among the n gathered keys, in its shard's order."""
    return [Seqs(q_len=e - s, k_len=plan.seq_len, q_offset=s) for s, e in plan.spans]


def sequence_parallel_forward(module: SparseAttention, inp: Tensor, group, layout: str) -> Tensor:
    """SparseAttention's forward for this rank's shard inp (b, nl, dim) -> its shard of the output (b, nl, dim)."""
    check_layout(layout)
    check_group(group, inp)
    check_shard_shapes(inp, group)  # every rank the same shard length: the checks below agree on all ranks
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    plan = shard_plan(module, inp.shape[1] * world, world, rank, layout)
    return shard_forward(module, inp, plan, lambda t: gather_sequence(t, group, layout))


def shard_forward(module: SparseAttention, inp: Tensor, plan: ShardPlan, gather: Callable[[Tensor], Tensor]) -> Tensor:
    """One rank's computation (module docstring): inp (b, nl, dim), this rank's shard as `plan`
    describes it; `gather` the all-gather (or a stand-in)."""
    if plan.seq_len != inp.shape[1] * plan.world:
        raise ValueError(f"the plan describes shards of {plan.seq_len // plan.world} tokens, the input holds {inp.shape[1]}")
    x = module.norm(inp)
    q, k, v = module.project(x)  # q (b, h, nl, d), k / v (b, branches * hk, nl, d)
    keys = shard_keys(module, k, v, plan, gather)
    pieces = shard_seqs(plan)
    cfg = module.config
    if cfg.causal:  # a piece sees no key after its last query: its keys (and their kernels' grids) end there
        ends = [p.q_offset + p.q_len for p in pieces]
        cut = [visible_keys(keys, end, cfg.stride, cfg.num_compressed_mem_kv, cfg.selection_block_size) for end in ends]
        pieces = [Seqs(q_len=p.q_len, k_len=end, q_offset=p.q_offset) for p, end in zip(pieces, ends)]
    else:
        cut = [keys] * len(pieces)
    if len(pieces) == 1:
        return module.attend(x, q, cut[0], pieces[0])
    outs, start = [], 0
    for piece, piece_keys in zip(pieces, cut):
        end = start + piece.q_len
        outs.append(module.attend(x[:, start:end], q[:, :, start:end], piece_keys, piece))
        start = end
    return torch.cat(outs, dim=1)


def visible_keys(keys: BranchKeys, end: int, stride: int, num_memory: int, selection_block_size: int) -> BranchKeys:
    """Causal: the keys of the tokens before `end` (the queries' last position + 1), the compressed
    tokens completed by then (memory tokens first) and the selection blocks completed by then; a query
    before `end` sees nothing else."""
    token = slice(0, end)
    compressed = slice(0, num_memory + end // stride)
    blocks = None if keys.selection_keys is None else keys.selection_keys[:, :, : end // selection_block_size]
    return BranchKeys(keys.compressed_k[:, :, compressed], keys.compressed_v[:, :, compressed],
                      keys.rotated_k[:, :, token], keys.v[:, :, token], keys.window_k[:, :, token],
                      keys.window_v[:, :, token], selection_keys=blocks)


def shard_keys(module: SparseAttention, k: Tensor, v: Tensor, plan: ShardPlan, gather) -> BranchKeys:
    """The branches' keys of the whole sequence from this rank's unrotated k, v (b, branches * hk, nl, d):
    compressed from its own windows and gathered, rotated on its own tokens and gathered."""
    (kc, vc), (ks, vs), (kw, vw) = module.branch_kv(k, v)
    ck, cv = shard_compress(module, kc, vc, plan, gather)
    positions = plan.positions(k.device)
    if not module.config.independent_kv:
        mine = torch.stack((module.rotate(ks, positions), vs))
    else:
        mine = torch.stack((module.rotate(ks, positions), vs, module.rotate(kw, positions), vw))
    # (2 or 4, b, hk, n, d): one collective; its backward runs before the compressed tokens' (`after`)
    gathered = gather(after(mine, ck, cv))
    ck, cv = with_memory(module.compress_mem_kv, ck, cv)
    return BranchKeys(ck, cv, *gathered, selection_keys=module.selection_keys_of(gathered[0]))


def shard_compress(module: SparseAttention, kc: Tensor, vc: Tensor, plan: ShardPlan, gather) -> tuple[Tensor, Tensor]:
    """This rank's unrotated compression keys / values (b, hk, nl, d) -> the whole sequence's compressed
    tokens (b, hk, c, d), c = n // stride: the windows ending in its chunks compressed here (halo from
    the previous chunks' tails), the rest gathered."""
    block, stride, L = plan.block, plan.stride, plan.chunk_len
    mine = torch.stack((kc, vc))  # (2, b, hk, nl, d)
    if plan.num_windows == 0:
        empty = kc.new_zeros(*kc.shape[:2], 0, kc.shape[-1])
        return empty, empty.clone()
    halo = None
    if plan.halo:
        tails = torch.cat([mine[..., (i + 1) * L - plan.halo : (i + 1) * L, :] for i in range(plan.pieces)], dim=-2)
        halo = gather(tails)  # (2, b, hk, chunks * halo, d): chunk j's last tokens at rows j * halo ...
    windows, counts = [], []
    for i, (s, e) in enumerate(plan.spans):
        first, last = plan.chunk_windows(s, e)
        counts.append(last - first)
        if last == first:
            continue
        own = mine[..., i * L : i * L + last * stride - s, :]  # tokens s ... last * stride - 1
        if plan.reach(s):
            own = torch.cat((halo.index_select(-2, plan.halo_index(s, kc.device)), own), dim=-2)
        pad = s - plan.reach(s) - (first * stride - (block - stride))  # left zeros: the sequence's first window
        own = F.pad(own, (0, 0, pad, 0)) if pad > 0 else own
        windows.append(own.unfold(-2, block, stride).transpose(-1, -2))  # (2, b, hk, last - first, block, d)
    cap = plan.window_capacity
    if windows:
        wins = torch.cat(windows, dim=3)
        ck, cv = module.compress_windows(wins[0], wins[1])
        compressed = torch.stack((ck, cv))  # (2, b, hk, own windows, d)
    else:  # no window ends here: an empty slice keeps the collectives' backward on this rank too
        compressed = mine[..., :0, :]
    compressed = after(compressed, halo)  # the halo's reduce-scatter after the compressed tokens'
    parts, start = [], 0
    for count in counts:  # each piece padded to `cap` rows
        parts.append(F.pad(compressed[..., start : start + count, :], (0, 0, 0, cap - count)))
        start += count
    every = gather(torch.cat(parts, dim=-2))  # (2, b, hk, chunks * cap, d)
    ck, cv = every.index_select(-2, plan.compressed_index(kc.device))
    return ck, cv


class StandInGather:
    """The all-gather on one device: this rank's rows put at its chunks, every other chunk's rows a
    leaf tensor made once per shape by `make(shape)` (random keys standing for the other ranks';
    their gradients stand for the reduce-scatter). `leaves` lists them in the order made."""

    def __init__(self, plan: ShardPlan, make: Callable[[tuple[int, ...]], Tensor]):
        self.plan, self.make = plan, make
        self.others: dict[tuple[int, ...], list[Tensor]] = {}

    @property
    def leaves(self) -> list[Tensor]:
        return [t for ts in self.others.values() for t in ts]

    def __call__(self, t: Tensor) -> Tensor:
        plan = self.plan
        rows = t.shape[-2] // plan.pieces
        own = {s // plan.chunk_len: piece for (s, _), piece in zip(plan.spans, t.split(rows, dim=-2))}
        shape = (*t.shape[:-2], rows, t.shape[-1])
        if shape not in self.others:
            self.others[shape] = [self.make(shape) for _ in range(plan.num_chunks - plan.pieces)]
        others = iter(self.others[shape])
        return torch.cat([own[j] if j in own else next(others) for j in range(plan.num_chunks)], dim=-2)
