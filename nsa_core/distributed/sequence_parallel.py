"""Sequence-parallel SparseAttention over a torch.distributed process group (NCCL on GPUs, gloo on CPU).

Each of the P ranks of the group holds a contiguous shard of the sequence: rank r holds tokens
r * n/P ... (r + 1) * n/P - 1 of every row, all shards the same length. A rank:
1. norms and projects its own shard: q (its queries only), k and v (its tokens only);
2. all-gathers the unrotated keys and values of the whole sequence (one collective per layer, with
   autograd: the backward pass reduce-scatters the key / value gradients back to their owners);
3. builds the branches' keys from the gathered sequence exactly as one device does (compression of
   all n / stride windows with the replicated compression networks, so windows that straddle shard
   boundaries need nothing special; rotary on every key);
4. runs `SparseAttention.attend` for its queries, described by the sequence descriptor
   `Seqs(q_len=n/P, k_len=n, q_offset=r * n/P)`: the ops see a shard as queries after other keys.
The shards of the outputs put together equal the single-device output; each rank's input gradient
is its shard of the single-device input gradient; parameter gradients summed over the ranks (the
reduction of FSDP / DDP, which average: see the README) equal the single-device gradients.

Why all-gather of keys and values rather than Ulysses' all-to-all over heads: with GQA the keys and
values are small (2 * kv_heads / heads of q, k, v and the output: 1/17 at the paper's 64 / 4 heads),
any P works (Ulysses needs P <= kv heads or replicated kv heads), and the selected blocks of a query
may sit anywhere before it, so a rank needs every key anyway. A rank receives about 2 * n * hk * d
elements per layer whatever P, Ulysses about (2 h + 2 hk) * n * d / P: less traffic up to P ~ 17 at
64 / 4 heads. Per query, NSA's selected and window branches cost the same everywhere; the causal
compressed branch grows with the position, so later shards carry more of it.
benchmarks/NOTES.md has the numbers.

Dimension legend: b batch, n whole sequence, nl = n / P tokens of a shard, h query heads, hk kv heads,
d head dim, P ranks of the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from nsa_core.ops.seqs import Seqs


def check_group(group, inp: Tensor) -> None:
    """A process group whose backends serve the input's device type."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence_parallel_group needs torch.distributed to be initialized (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"sequence_parallel_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    device_types = {torch.device(d).type for d in group._device_types}
    if inp.device.type not in device_types:
        raise ValueError(
            f"sequence_parallel_group serves {sorted(device_types)} tensors (backend {dist.get_backend(group)!r}), "
            f"but the input is on {inp.device.type}: use a gloo group for CPU tensors, NCCL for CUDA tensors"
        )


def check_shard_shapes(inp: Tensor, group) -> None:
    """Every rank must pass the same batch size and shard length (a tiny all-gather of the shapes).
    Raises the same ValueError on every rank, so none of them waits in a later collective."""
    shape = torch.tensor([inp.shape[0], inp.shape[1]], dtype=torch.int64, device=inp.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    shapes = [tuple(s.tolist()) for s in shapes]  # the one host sync: the check needs the values
    if len(set(shapes)) > 1:
        raise ValueError(
            "sequence_parallel_group: every rank must pass a shard of the same batch size and length "
            f"(the sequence length must be divisible by the {len(shapes)} ranks); got (batch, shard length) per rank "
            f"{shapes}"
        )


# torch 2.13 renamed the single-tensor collectives (the old names warn); torch >= 2.5 has the old ones
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim -2 in rank order; backward: the gradient of every rank's copy summed
    and cut to this rank's shard (a reduce-scatter; on gloo an all-reduce, for CPU tests)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        shard = t.movedim(-2, 0).contiguous()  # (nl, ..., d): the collectives concatenate dim 0
        out = shard.new_empty((dist.get_world_size(group) * shard.shape[0], *shard.shape[1:]))
        _ALL_GATHER(out, shard, group=group)
        return out.movedim(0, -2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.movedim(-2, 0).contiguous()  # (n, ..., d)
        shard_len = grad.shape[0] // world
        if dist.get_backend(group) == "gloo":
            dist.all_reduce(grad, group=group)
            mine = grad[rank * shard_len : (rank + 1) * shard_len]
        else:
            mine = grad.new_empty((shard_len, *grad.shape[1:]))
            _REDUCE_SCATTER(mine, grad, group=group)
        return mine.movedim(0, -2), None


def gather_sequence(t: Tensor, group) -> Tensor:
    """t (..., nl, d) of this rank -> (..., n, d): the shards of all ranks in rank order, with autograd
    (the backward pass sums the gradients of every rank's copy and hands each rank its shard's)."""
    return _GatherSequence.apply(t, group)


def shard_seqs(shard_len: int, group) -> Seqs:
    """The descriptor of this rank's queries among the gathered keys."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return Seqs(q_len=shard_len, k_len=shard_len * world, q_offset=rank * shard_len)


def sequence_parallel_forward(module, inp: Tensor, group) -> Tensor:
    """SparseAttention's forward for this rank's shard inp (b, nl, dim) -> its shard of the output (b, nl, dim)."""
    check_group(group, inp)
    check_shard_shapes(inp, group)
    return shard_forward(module, inp, lambda kv: gather_sequence(kv, group), shard_seqs(inp.shape[1], group))


def shard_forward(module, inp: Tensor, gather, seqs: Seqs) -> Tensor:
    """One rank's computation: `gather` maps this shard's stacked keys and values (2, b, hk, nl, d) to
    the whole sequence's (2, b, hk, n, d) (the collective; benchmarks pass a stand-in to time one
    rank's compute on one GPU); `seqs` places the shard's queries among the n keys."""
    x = module.norm(inp)
    q, k, v = module.project(x)  # q (b, h, nl, d), k / v (b, hk, nl, d)
    kv = gather(torch.stack((k, v)))  # (2, b, hk, n, d): one collective for both
    keys = module.keys_of(kv[0], kv[1])
    return module.attend(x, q, keys, seqs)
