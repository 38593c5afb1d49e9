"""Train nsa_core's Transformer with FSDP2 and sequence parallelism together.

    torchrun --standalone --nproc-per-node 2 examples/train_sequence_parallel.py            # CPU: gloo
    torchrun --standalone --nproc-per-node 8 examples/train_sequence_parallel.py --seq-len 65536 --dim 512

One group of P ranks does both: FSDP2 (`fully_shard`) shards the parameters over it, and every
sequence is split over it (every rank reads the same batch and keeps its shard,
nsa_core.distributed.shard_sequence). --layout balanced (the default): the sequence is cut into 2P
chunks and rank r holds chunks r and 2P - 1 - r, so every rank does the same work (the causal
compressed branch costs more for later tokens); --layout contiguous: rank r holds tokens
r * n / P ... (r + 1) * n / P - 1. Each sparse attention layer all-gathers the keys and values of the
whole sequence (nsa_core/distributed/sequence_parallel.py); everything else is per token.
CUDA devices use NCCL, CPUs gloo. The data is synthetic and learnable: every row repeats one of a
few fixed random motifs, so the loss falls within a few steps.

Each rank's loss is its share of the whole sequence's mean (summed over ranks: the mean); FSDP
averages gradients over the ranks, so the backward pass runs on P times the share.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from nsa_core.distributed import LAYOUTS, shard_sequence
from nsa_core.model.transformer import Transformer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=256,
                   help="whole sequence; divisible by the number of ranks (balanced: by twice that)")
    p.add_argument("--layout", choices=LAYOUTS, default="balanced",
                   help="how the sequence is split: balanced (equal work per rank) or contiguous")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-tokens", type=int, default=64)
    p.add_argument("--motif", type=int, default=12, help="length of the motif every row repeats")
    p.add_argument("--num-motifs", type=int, default=4, help="how many different motifs the rows draw from")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim-head", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def batch(args, step: int, device) -> torch.Tensor:
    """The same (batch, seq_len) rows on every rank: motifs of a fixed pool, repeated."""
    pool = torch.randint(0, args.num_tokens, (args.num_motifs, args.motif), generator=torch.Generator().manual_seed(args.seed))
    gen = torch.Generator().manual_seed(args.seed * 100_003 + step)
    motif = pool[torch.randint(0, args.num_motifs, (args.batch_size,), generator=gen)]
    reps = -(-args.seq_len // args.motif)
    return motif.repeat(1, reps)[:, : args.seq_len].to(device)


def main(argv=None) -> None:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    multiple = 2 * world if args.layout == "balanced" else world
    if args.seq_len % multiple:
        raise ValueError(f"--seq-len {args.seq_len} must be divisible by {multiple} ({world} ranks, {args.layout} layout)")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))
    group = mesh.get_group()

    torch.manual_seed(args.seed)  # the same initial weights on every rank before sharding
    model = Transformer(
        num_tokens=args.num_tokens, dim=args.dim, depth=args.depth, dim_head=args.dim_head, heads=args.heads,
        kv_heads=args.kv_heads, use_sparse_attn=True, causal=True,
        sparse_attn_kwargs=dict(sliding_window_size=16, compress_block_size=8, compress_block_sliding_stride=4,
                                selection_block_size=8, num_selected_blocks=4),
    ).to(device)
    for attn, ff in model.layers:
        fully_shard(attn, mesh=mesh)
        fully_shard(ff, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    for step in range(args.steps):
        ids = shard_sequence(batch(args, step, device), group, args.layout)  # this rank's shard of every row
        share = model(ids, return_loss=True, sequence_parallel_group=group, sequence_parallel_layout=args.layout)
        (share * world).backward()  # FSDP averages over the ranks; the shares sum
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = share.detach().clone()
        dist.all_reduce(loss, group=group)
        if rank == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    # Every rank finishes its collectives before any tears the group down: a rank that destroys
    # gloo's pairs while its peer still waits aborts the peer ("terminate called ...").
    dist.barrier(group=group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
