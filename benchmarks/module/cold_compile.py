"""Cold compile time: the first and second forward+backward of SparseAttention in a fresh process whose
Triton and Inductor caches are new empty folders (what the first call of a new configuration pays)."""

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
from nsa_core import SparseAttention, get_preset
preset, seq_len, device = sys.argv[1], int(sys.argv[2]), torch.device(sys.argv[3])
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
print(json.dumps({"first_call_s": call_s(), "second_call_s": call_s()}))
"""


def compile_time(preset: str, seq_len: int, device: str, timeout_s: int = 540) -> dict:
    """First and second forward+backward of SparseAttention(preset) in a fresh process whose Triton and
    Inductor caches are new empty folders: what the first call of a new configuration pays."""
    caches = {name: tempfile.mkdtemp(prefix=f"nsa-cold-{name.lower()}-") for name in
              ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, **caches, "PYTHONPATH": path}
    result = {"preset": preset, "seq_len": seq_len, "device": device, "limit_s": COMPILE_LIMIT_S}
    try:
        child = subprocess.run([sys.executable, "-c", COMPILE_CHILD, preset, str(seq_len), device], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=timeout_s)
        if child.returncode != 0:
            tail = child.stderr.strip().splitlines()
            result["error"] = f"exit {child.returncode}: {tail[-1] if tail else ''}"
        else:
            result.update(json.loads(child.stdout.strip().splitlines()[-1]))
            result["within_limit"] = result["first_call_s"] <= COMPILE_LIMIT_S
    except subprocess.TimeoutExpired:
        result["error"] = f"did not finish in {timeout_s} s"
    finally:
        for folder in caches.values():
            shutil.rmtree(folder, ignore_errors=True)
    return result
