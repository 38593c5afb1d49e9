"""Ahead-of-time compilation of the kernels' launches for a GPU that need not be here.

`captured_launches` records the Triton launches that the launchers make (run them on meta tensors:
no GPU, nothing allocated) instead of running them (the library's recorder,
nsa_core/kernels/precompile.py, keeping the tensors); `compile_launch` compiles one for a target
(sm_90 by default) exactly as Triton would at that launch: the same specialization of its
arguments, constexprs, num_warps and num_stages. The compiled kernel's metadata gives the shared
memory it needs (`metadata.shared`), which Triton checks against the device's limit only at launch.
Used by tools/smem_sweep.py and its tests. Needs Triton's JIT (not TRITON_INTERPRET=1) and
its NVIDIA backend (ptxas).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton._C.libtriton import ir
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from nsa_core.kernels.precompile import RecordedLaunch, recorded_launches

SM90 = GPUTarget("cuda", 90, 32)
# Shared memory per block that Triton lets a kernel launch with on an H100 (sm_90: 227 KiB)
SM90_SHARED_LIMIT = 232448


Launch = RecordedLaunch  # one recorded launch: kernel, args, kwargs (and its grid)


@contextlib.contextmanager
def captured_launches() -> Iterator[list[Launch]]:
    """Within the block, every Triton kernel launch is appended to the yielded list (with its tensors) and
    not run. Raises if the kernels were built by the interpreter (TRITON_INTERPRET=1): nothing to compile."""
    if getattr(knobs.runtime, "interpret", False):
        raise RuntimeError("TRITON_INTERPRET=1: kernels are interpreted, there is nothing to compile")
    with recorded_launches(stand_ins=False) as launches:
        yield launches


@dataclass(frozen=True)
class Prepared:
    """What Triton would compile for a launch: the source (specialized) and the options."""

    source: ASTSource
    options: object

    @property
    def key(self) -> str:
        """Identifies the compiled kernel: two launches with one key compile to one binary."""
        return f"{self.source.hash()}-{self.options.hash()}"


def prepare(launch: Launch, target: GPUTarget = SM90) -> Prepared:
    """Specialize a launch's arguments as Triton's launcher does (types, alignment, constexprs)."""
    backend = make_backend(target)
    kwargs = dict(launch.kwargs, debug=bool(launch.kernel.debug or knobs.runtime.debug))
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what JITFunction.run adds
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, kwargs, bound, specialization, options)
    return Prepared(ASTSource(launch.kernel, signature, constexprs, attrs), options)


def compile_launch(launch: Launch | Prepared, target: GPUTarget = SM90):
    """The compiled kernel of a launch for target (Triton's cache applies: TRITON_CACHE_DIR)."""
    prepared = launch if isinstance(launch, Prepared) else prepare(launch, target)
    return triton.compile(prepared.source, target=target, options=prepared.options.__dict__)


def lowered_metadata(launch: Launch | Prepared, target: GPUTarget = SM90) -> dict:
    """The metadata of a launch's kernel lowered to LLVM IR only (triton.compile's stages up to
    "llir", not cached): shared memory is allocated by then, so `shared` equals the compiled
    kernel's; what is skipped (PTX, ptxas) is most of the time of large float32 kernels."""
    prepared = launch if isinstance(launch, Prepared) else prepare(launch, target)
    backend = make_backend(target)
    options = backend.parse_options(prepared.options.__dict__)
    stages: dict = {}
    backend.add_stages(stages, options, prepared.source.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = prepared.source.make_ir(target, options, backend.get_codegen_implementation(options),
                                     backend.get_module_map(), context)
    metadata = {"hash": prepared.key, "target": target, **options.__dict__}
    for ext in ("ttir", "ttgir", "llir"):
        module = stages[ext](module, metadata)
    return metadata
