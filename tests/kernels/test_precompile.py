"""nsa_core.precompile: the launches a call makes are recorded instead of run, one compile per distinct kernel
specialization, on several threads; the module's and inputs' gradients are left as they were; on a GPU
(marked gpu) the first call after it compiles nothing and gives the outputs of a module never precompiled.

Recording needs Triton's JIT (under TRITON_INTERPRET=1 kernels are interpreted functions, nothing to record),
so the recording test runs in a subprocess without it, on CPU tensors (nothing is launched)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nsa_core import SparseAttention, get_preset, precompile
from nsa_core.kernels.precompile import RecordedLaunch, warm

ROOT = Path(__file__).resolve().parents[2]

RECORDING_CHILD = r"""
import json, threading, torch
from nsa_core.kernels.precompile import compile_all, distinct, recorded_launches
from nsa_core.kernels.sliding_window import launch

def problem(T, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, T, 32, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, T, 32, generator=g).to(dtype) for _ in range(2))
    return q, k, v

with recorded_launches() as launches:
    for T, dtype in ((96, torch.float32), (112, torch.float32), (97, torch.float32), (96, torch.bfloat16)):
        q, k, v = problem(T, dtype)
        launch.sliding_window_fwd(q, k, v, 24, 32 ** -0.5)
names, threads = [], set()
def fake_compile(l):
    names.append(l.kernel.fn.__name__)
    threads.add(threading.get_ident())
kernels = distinct(launches)
compile_all(kernels, workers=2, compile_one=fake_compile)
from tools.aot import Launch, captured_launches, compile_launch, prepare
with captured_launches() as real:  # the same calls with their real tensors
    for T, dtype in ((96, torch.float32), (112, torch.float32), (97, torch.float32), (96, torch.bfloat16)):
        q, k, v = problem(T, dtype)
        launch.sliding_window_fwd(q, k, v, 24, 32 ** -0.5)
# what Triton would compile (source and options hash) is the same for the stand-ins as for the real tensors
same_binaries = ({prepare(Launch(l.kernel, l.args, l.kwargs)).key for l in kernels}
                 == {prepare(l).key for l in real})
shared = None
try:  # Triton's own compiler takes the stand-ins: compiled for an H100 here (no GPU), where ptxas exists
    shared = [compile_launch(Launch(l.kernel, l.args, l.kwargs)).metadata.shared for l in kernels]
except Exception as e:
    if "ptxas" not in str(e).lower() and not isinstance(e, FileNotFoundError):
        raise
print(json.dumps({"launches": len(launches), "kernels": len(kernels), "names": names, "threads": len(threads),
                  "tensor_args": [type(a).__name__ for a in launches[0].args if hasattr(a, "dtype")][:2],
                  "shared": shared, "same_binaries": same_binaries}))
"""


def test_launches_are_recorded_not_run_and_compiled_once_per_specialization():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", RECORDING_CHILD], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["launches"] >= 4  # one forward launch per call at least (nothing ran: CPU tensors, no GPU)
    # T 96 and 112 (both multiples of 16) specialize alike; T 97 and bfloat16 each compile their own
    per_call = out["launches"] // 4
    assert out["kernels"] == 3 * per_call, out
    assert set(out["names"]) == {"sliding_window_fwd_kernel"} and len(out["names"]) == out["kernels"]
    assert out["tensor_args"] == ["_AlignedTensor", "_AlignedTensor"]  # no tensor (no memory) is held
    assert out["threads"] >= 1
    assert out["same_binaries"], "the stand-ins would compile other kernels than the real launches: no cache hit"
    if out["shared"] is not None:  # the stand-ins compile as the real tensors would (sm_90, ahead of time)
        assert len(out["shared"]) == out["kernels"] and all(s > 0 for s in out["shared"])


def test_warm_compiles_without_running_and_loads_what_it_compiled():
    """A first launch also loads the kernel and builds its launcher (Triton 3.6 compiles a C launcher per
    signature then): warm does both, so the first real call after precompile finds nothing left to do."""
    calls = []

    class Compiled:
        def _init_handles(self):
            calls.append("loaded")

    class Kernel:
        def run(self, *args, grid, warmup, **kwargs):
            calls.append(("run", args, grid, warmup, kwargs))
            return Compiled()

    warm(RecordedLaunch(Kernel(), (1, 2.0), {"BLOCK": 16}, (3, 1, 1)))
    assert calls == [("run", (1, 2.0), (3, 1, 1), True, {"BLOCK": 16}), "loaded"]


def test_precompile_leaves_gradients_as_they_were():
    torch.manual_seed(0)
    attn = SparseAttention.from_config(get_preset("tiny"))
    x = torch.randn(2, 37, attn.config.dim, requires_grad=True)
    first = next(attn.parameters())
    first.grad = torch.full_like(first, 3.0)
    result = precompile(attn, x)
    assert set(result) == {"launches", "kernels", "record_s", "compile_s"}
    assert torch.equal(first.grad, torch.full_like(first, 3.0))
    assert all(p.grad is None for p in list(attn.parameters())[1:]) and x.grad is None


@pytest.mark.parametrize("bad, error", [({"backward": 1}, TypeError), ({"workers": 0}, ValueError),
                                        ({"workers": True}, ValueError)])
def test_precompile_names_a_bad_argument(bad, error):
    with pytest.raises(TypeError, match="module"):
        precompile(lambda x: x, torch.randn(2))
    attn = SparseAttention.from_config(get_preset("tiny"))
    with pytest.raises(error, match=next(iter(bad))):
        precompile(attn, torch.randn(1, 8, attn.config.dim), **bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_first_call_after_precompile_compiles_nothing_and_equals_a_plain_module():
    torch.manual_seed(1)
    cfg = get_preset("paper")
    attn = SparseAttention.from_config(cfg).cuda().to(torch.bfloat16)
    plain = SparseAttention.from_config(cfg).cuda().to(torch.bfloat16)
    plain.load_state_dict(attn.state_dict())
    x = torch.randn(1, 1234, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    result = precompile(attn, x)
    assert result["kernels"] >= 5 and result["launches"] >= result["kernels"]
    assert x.grad is None and all(p.grad is None for p in attn.parameters())
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = attn(x)
    out.float().square().sum().backward()
    torch.cuda.synchronize()
    first_call = time.perf_counter() - start
    grad_x = x.grad.clone()
    x.grad = None
    ref = plain(x)
    ref.float().square().sum().backward()
    assert torch.equal(out, ref)  # the forward is deterministic; the backward may add in another order
    torch.testing.assert_close(grad_x, x.grad, rtol=2e-2, atol=2e-2 * float(x.grad.abs().max()))
    assert first_call < 2.0, f"the first call after precompile took {first_call:.2f} s: something compiled"
