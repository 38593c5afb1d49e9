"""Run a function on P local processes joined in a gloo group (CPU tests of sequence parallelism).

`run_ranks(fn, P, *args)` spawns P processes; each initializes the default group over a free
localhost port and calls fn(rank, P, *args). An exception in any rank fails the call (the others
are stopped), so asserting inside fn is a test. fn must be importable: a module-level function.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)  # P processes share this machine's few cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears gloo's pairs down while a peer still waits on them
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args) -> None:
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
