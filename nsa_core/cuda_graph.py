"""The one way the library captures a CUDA graph: the function run once on a side stream first (kernel
compilation, the caching allocator's first allocations), then captured. Generation's decoding step
(model/generation.py) and the decode timing (`nsa bench --decode`) replay what it captures.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], T], after_warmup: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """fn run once on a side stream, then `after_warmup` (undo what the warm-up wrote, e.g. a cache's
    tokens), then fn captured -> (the graph, fn's output: static tensors every replay overwrites).
    The capture runs fn's host code once and its device code not at all."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        if after_warmup is not None:
            after_warmup()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
