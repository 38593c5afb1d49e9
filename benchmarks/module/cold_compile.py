"""Cold compile time: the first and second forward+backward of SparseAttention in a fresh process whose
Triton and Inductor caches are new empty folders (what the first call of a new configuration pays), and
the same after `nsa_core.precompile` (the kernels compiled in parallel ahead of the call)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPILE_LIMIT_S = 20.0

COMPILE_CHILD = r"""
import json, sys, time
import torch
from nsa_core import SparseAttention, get_preset, precompile
preset, seq_len, device, ahead = sys.argv[1], int(sys.argv[2]), torch.device(sys.argv[3]), sys.argv[4] == "precompile"
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
nsa = SparseAttention.from_config(get_preset(preset)).to(device, dtype)
x = torch.randn(1, seq_len, nsa.config.dim, device=device, dtype=dtype, requires_grad=True)
def call_s():
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = nsa(x)
    out.backward(torch.ones_like(out))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
result = {}
if ahead:
    start = time.perf_counter()
    result["precompile"] = precompile(nsa, x)
    result["precompile_s"] = time.perf_counter() - start
result.update(first_call_s=call_s(), second_call_s=call_s())
print(json.dumps(result))
"""


def compile_time(preset: str, seq_len: int, device: str, timeout_s: int = 540, precompiled: bool = False) -> dict:
    """First and second forward+backward of SparseAttention(preset) in a fresh process whose Triton and
    Inductor caches are new empty folders: what the first call of a new configuration pays. precompiled:
    nsa_core.precompile runs first (its time is "precompile_s"; the limit applies to it + the first call)."""
    caches = {name: tempfile.mkdtemp(prefix=f"nsa-cold-{name.lower()}-") for name in
              ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, **caches, "PYTHONPATH": path}
    result = {"preset": preset, "seq_len": seq_len, "device": device, "limit_s": COMPILE_LIMIT_S,
              "precompiled": precompiled}
    try:
        child = subprocess.run([sys.executable, "-c", COMPILE_CHILD, preset, str(seq_len), device,
                                "precompile" if precompiled else "plain"], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=timeout_s)
        if child.returncode != 0:
            tail = child.stderr.strip().splitlines()
            result["error"] = f"exit {child.returncode}: {tail[-1] if tail else ''}"
        else:
            result.update(json.loads(child.stdout.strip().splitlines()[-1]))
            result["within_limit"] = result.get("precompile_s", 0.0) + result["first_call_s"] <= COMPILE_LIMIT_S
    except subprocess.TimeoutExpired:
        result["error"] = f"did not finish in {timeout_s} s"
    finally:
        for folder in caches.values():
            shutil.rmtree(folder, ignore_errors=True)
    return result
