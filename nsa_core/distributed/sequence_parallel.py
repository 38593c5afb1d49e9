"""Sequence parallelism's shard layouts and collectives over a torch.distributed process group (NCCL
on GPUs, gloo on CPU). Knows no module: the pass that runs SparseAttention on a shard is
model/sequence_parallel.py.

Each of the P ranks of the group holds a shard of the sequence, all shards the same length nl = n/P,
in one of two layouts (`sequence_parallel_layout`):
- "balanced" (zigzag, the default, DEFAULT_LAYOUT): the sequence is cut into 2P chunks of n / 2P
  tokens, and rank r holds chunk r then chunk 2P - 1 - r (its shard is their concatenation, in that
  order; n must divide by 2P: a ValueError says so and names the other layout otherwise);
- "contiguous": rank r holds tokens r * nl ... (r + 1) * nl - 1 of every row (any n divisible by P).
Why balanced: per query, NSA's selected and window branches cost the same everywhere, but the causal
compressed branch grows with the position (a query attends every compressed block before it), so
the last contiguous shard carries most of it (at 229k tokens on 2 ranks, ~3/4) and the other ranks
wait for it. Chunk r (early, cheap) plus chunk 2P - 1 - r (late, costly) gives every rank the same
work: the positions of a rank's queries sum to the same total on every rank.

`shard_sequence` cuts a rank's shard out of a whole tensor, `unshard_sequence` puts every rank's
shard back in sequence order, `gather_sequence` all-gathers a shard's tensor into the whole sequence
with autograd (the backward pass reduce-scatters the gradients back to their owners).

Dimension legend: n whole sequence, nl = n / P tokens of a shard, d head dim, P ranks of the group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("contiguous", "balanced")
DEFAULT_LAYOUT = "balanced"


def resolve_layout(layout, group=None) -> str:
    """forward's sequence_parallel_layout: None is DEFAULT_LAYOUT with a group (and "contiguous", the
    only meaning a single device has, without one); a name is checked (a layout named without a group
    is an error: it describes shards)."""
    if layout is None:
        return DEFAULT_LAYOUT if group is not None else "contiguous"
    check_layout(layout, group, needs_group=True)
    return layout


def check_layout(layout, group=None, *, needs_group: bool = False) -> None:
    """layout must be one of LAYOUTS; a layout other than "contiguous" needs a group (when needs_group)."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"sequence_parallel_layout must be one of {LAYOUTS}, got {layout!r}")
    if needs_group and group is None and layout != "contiguous":
        raise ValueError(f"sequence_parallel_layout={layout!r} needs a sequence_parallel_group (it describes shards)")


def _pieces_per_shard(layout: str) -> int:
    return 2 if layout == "balanced" else 1


def shard_spans(seq_len: int, world: int, rank: int, layout: str = DEFAULT_LAYOUT) -> list[tuple[int, int]]:
    """The token ranges [start, end) of the whole sequence (seq_len tokens) that rank `rank` of `world`
    holds, in the order of its shard: contiguous [(r nl, (r + 1) nl)], balanced chunk r then chunk
    2P - 1 - r (both ascending)."""
    check_layout(layout)
    pieces = _pieces_per_shard(layout)
    if seq_len % (pieces * world):
        need = f"2 x the {world} ranks = {2 * world}" if pieces == 2 else f"the {world} ranks"
        hint = (" (every shard an even number of tokens); sequence_parallel_layout='contiguous' takes any length "
                f"divisible by {world}") if pieces == 2 else ""
        raise ValueError(f"sequence_parallel_layout={layout!r}: the sequence length ({seq_len}) must be divisible by "
                         f"{need}{hint}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0 ... {world - 1}, got {rank}")
    chunk = seq_len // (pieces * world)
    chunks = [rank] if pieces == 1 else [rank, 2 * world - 1 - rank]
    return [(c * chunk, (c + 1) * chunk) for c in chunks]


def shard_sequence(x: Tensor, group, layout: str = DEFAULT_LAYOUT, dim: int = 1) -> Tensor:
    """This rank's shard of the whole tensor x along `dim` (the sequence; 1 for (b, n, ...) inputs,
    ids and targets): what to pass to forward(..., sequence_parallel_group=group,
    sequence_parallel_layout=layout)."""
    spans = shard_spans(x.shape[dim], dist.get_world_size(group), dist.get_rank(group), layout)
    parts = [x.narrow(dim, s, e - s) for s, e in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def to_sequence_order(gathered: Tensor, world: int, layout: str = DEFAULT_LAYOUT, dim: int = 1) -> Tensor:
    """The world shards concatenated along `dim` in rank order -> the whole sequence in its order
    (contiguous: the same tensor; balanced: the 2P chunks reordered, one concatenation of views)."""
    check_layout(layout)
    if layout == "contiguous":
        return gathered
    if gathered.shape[dim] % (2 * world):
        raise ValueError(f"balanced shards of {world} ranks hold 2 x {world} equal chunks: got {gathered.shape[dim]} tokens")
    chunk = gathered.shape[dim] // (2 * world)
    # sequence chunk j < P is the first half of rank j's shard, chunk j >= P the second of rank 2P - 1 - j
    slots = [2 * j if j < world else 2 * (2 * world - 1 - j) + 1 for j in range(2 * world)]
    return torch.cat([gathered.narrow(dim, s * chunk, chunk) for s in slots], dim=dim)


def unshard_sequence(shards: Sequence[Tensor], layout: str = DEFAULT_LAYOUT, dim: int = 1) -> Tensor:
    """Every rank's shard (a list in rank order, as dist.all_gather fills it) -> the whole sequence
    along `dim`: the inverse of shard_sequence."""
    return to_sequence_order(torch.cat(list(shards), dim=dim), len(shards), layout, dim)


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


def gather_sequence(t: Tensor, group, layout: str = DEFAULT_LAYOUT) -> Tensor:
    """t (..., nl, d) of this rank -> (..., n, d): the whole sequence in its order (the shards of all
    ranks in rank order, balanced: their chunks reordered), with autograd (the backward pass sums the
    gradients of every rank's copy and hands each rank its shard's, in the shard's order)."""
    return to_sequence_order(_GatherSequence.apply(t, group), dist.get_world_size(group), layout, dim=-2)


class _After(torch.autograd.Function):
    """t unchanged; its backward hands zero gradients to `deps` (module docstring of `after`)."""

    @staticmethod
    def forward(ctx, t: Tensor, *deps: Tensor) -> Tensor:
        ctx.deps = [(d.shape, d.dtype, d.device) for d in deps]
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.deps))


def after(t: Tensor, *deps: Tensor) -> Tensor:
    """t, with an autograd edge to each of `deps` (zero gradients): the backward of whatever produced
    deps runs only after the backward of whatever consumes t. The pass chains its all-gathers with it
    so that every rank runs their reduce-scatters in one order (collectives must match across ranks,
    and autograd's order over independent branches follows each rank's graph), and so that every
    rank reaches every collective's backward even when its own tokens do not use the gathered result."""
    deps = tuple(d for d in deps if d is not None and d.requires_grad)
    return _After.apply(t, *deps) if deps else t
