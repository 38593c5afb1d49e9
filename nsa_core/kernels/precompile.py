"""Compiling the Triton kernels of a call in parallel, before the call, so its first run does not
compile them one after another.

`precompile(module, *inputs)` runs the module's forward (and backward) once with every Triton launch
recorded instead of run, then compiles the distinct launches on a thread pool through Triton's own
`warmup` (its compiler releases the GIL for its passes and ptxas), which fills the same caches a
launch reads, then loads each kernel and builds its launcher: the next real call finds each kernel
ready. The recorded pass needs no kernel's output: the launchers read no device values (no host
sync), so the rest of the pass runs on whatever the unrun kernels' buffers hold, and the gradients
it leaves are put back as they were.
The cuBLAS / cuDNN calls of that pass run for real, so their set-up is paid there too.

On the CPU (the PyTorch path) or under Triton's interpreter nothing is recorded and nothing compiled.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from triton.runtime.jit import JITFunction, MockTensor


@dataclass(frozen=True)
class RecordedLaunch:
    """One launch as recorded: the kernel, its arguments (tensors as stand-ins, or the tensors themselves),
    and its grid."""

    kernel: JITFunction
    args: tuple
    kwargs: dict = field(default_factory=dict)
    grid: object = None

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> tuple:
        """Launches with one key compile to one kernel: tensors by dtype and 16-byte alignment, integers
        by what Triton specializes on (equal to 1, divisible by 16, 64-bit), everything else by value."""
        return (id(self.kernel), tuple(_specialization(a) for a in self.args),
                tuple(sorted((k, repr(v)) for k, v in self.kwargs.items())))


def _specialization(arg) -> object:
    if isinstance(arg, _AlignedTensor):
        return ("tensor", str(arg.dtype), arg.aligned)
    if isinstance(arg, Tensor):
        return ("tensor", str(arg.dtype), arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool) or arg is None:
        return arg
    if isinstance(arg, int):
        return ("int", arg == 1, arg % 16 == 0, not -2**31 <= arg < 2**31)
    if isinstance(arg, float):
        return "float"
    return repr(arg)


class _AlignedTensor(MockTensor):
    """A recorded tensor: Triton's warmup stand-in (its dtype; no memory held), with the real one's alignment."""

    def __init__(self, tensor: Tensor):
        self.dtype = tensor.dtype
        self.shape = list(tensor.shape)
        self.aligned = tensor.data_ptr() % 16 == 0

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8


@contextlib.contextmanager
def recorded_launches(stand_ins: bool = True) -> Iterator[list[RecordedLaunch]]:
    """Within the block, every Triton kernel launch is appended to the yielded list instead of run.
    stand_ins: tensors recorded as their dtype and alignment (no memory held; what precompile compiles);
    False: the tensors themselves (tools/aot.py compiles those for a GPU that need not be here)."""
    launches: list[RecordedLaunch] = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        if warmup:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        if stand_ins:
            args = tuple(_AlignedTensor(a) if isinstance(a, Tensor) else a for a in args)
        launches.append(RecordedLaunch(self, tuple(args), dict(kwargs), grid))
        return None

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


def distinct(launches: list[RecordedLaunch]) -> list[RecordedLaunch]:
    """The first launch of each key, in order."""
    seen: dict[tuple, RecordedLaunch] = {}
    for launch in launches:
        seen.setdefault(launch.key(), launch)
    return list(seen.values())


def warm(launch: RecordedLaunch) -> None:
    """Compile one launch as Triton would at its first run, without running it, and prepare what the first run
    would prepare: the kernel loaded on the current GPU and its launcher built (Triton 3.6 compiles a C launcher
    per kernel signature with the host compiler there, ~0.2 s each: 2.8 s for the paper preset's 14 kernels when
    done one after another at the first call)."""
    compiled = launch.kernel.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
    load = getattr(compiled, "_init_handles", None)  # what CompiledKernel.run does at the first launch
    if load is not None:
        load()


def default_workers() -> int:
    """The CPUs this process may use, at most 32."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(32, cpus)


def compile_all(launches: list[RecordedLaunch], workers: int | None = None,
                compile_one: Callable[[RecordedLaunch], None] = warm) -> None:
    """Compile the launches on `workers` threads, each on the caller's current CUDA device."""
    if not launches:
        return
    device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def on_device(launch: RecordedLaunch) -> None:
        if device is not None:
            torch.cuda.set_device(device)
        compile_one(launch)

    with ThreadPoolExecutor(max_workers=max(1, min(workers or default_workers(), len(launches)))) as pool:
        list(pool.map(on_device, launches))


def precompile(module: nn.Module, *inputs, backward: bool = True, workers: int | None = None, **kwargs) -> dict:
    """Compile the kernels that `module(*inputs, **kwargs)` (and, with backward, the backward of the sum of
    its floating outputs) will launch, in parallel; returns {"launches", "kernels", "record_s", "compile_s"}.

    Call it once with inputs of the shapes and dtypes training or serving will use (Triton specializes
    lengths only on being 1 or a multiple of 16, so e.g. any other multiple of 16 compiles the same kernels);
    the module's and the inputs' gradients are left as they were. workers: compiler threads (default: this
    process's CPUs, at most 32).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(backward, bool):
        raise TypeError(f"backward must be a bool, got {backward!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be an int >= 1 or None, got {workers!r}")
    watched = list(module.parameters()) + [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    saved = [p.grad for p in watched]
    for p in watched:
        p.grad = None  # the pass's backward would otherwise add into the saved tensors
    start = time.perf_counter()
    try:
        with recorded_launches() as launches:
            out = module(*inputs, **kwargs)
            if backward:
                leaves = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
                if leaves:
                    torch.autograd.backward([t.sum() for t in leaves])
    finally:
        for p, grad in zip(watched, saved):
            p.grad = grad
    recorded = time.perf_counter() - start
    kernels = distinct(launches)
    compile_all(kernels, workers)
    return {"launches": len(launches), "kernels": len(kernels), "record_s": round(recorded, 3),
            "compile_s": round(time.perf_counter() - start - recorded, 3)}


def _tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _tensors(item)]
    return []
