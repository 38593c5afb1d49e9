"""Shared memory of the kernels, compiled ahead of time for an H100 (sm_90) on any machine (no GPU):
at the corners of the documented support (tools/kernel_launches.ci_corners: a shape at the
shared-memory limit, and the largest tiles the rules give the by-block kernels and float32), every
launch the launchers make stays within the budget (tools/smem_sweep.py). The whole support
matrix: `python -m tools.smem_sweep` (hours); the GPU run: test_selected_attention_matrix.py.

Runs the sweep in a subprocess without TRITON_INTERPRET (conftest.py sets it on machines without
CUDA, and interpreted kernels cannot be compiled); skipped without Triton's NVIDIA backend."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def nvidia_backend_reason() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001
        return f"Triton's NVIDIA backend or its ptxas is unavailable: {e}"
    return None if os.path.exists(ptxas) else f"no ptxas at {ptxas}"


@pytest.mark.skipif(nvidia_backend_reason() is not None, reason=str(nvidia_backend_reason()))
def test_corners_fit_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "tools.smem_sweep", "--ci",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["config"] for r in rows} >= {"selected D256 bf16 blk128 G8 S16 causal"}, "the reported defect is checked"
    failed = [r for r in rows if "error" in r]
    assert not failed, failed
    over = [f"{r['kernel']} {r['shared']} B: {r['config']} / {r['scheme']}" for r in rows if r["shared"] > result["budget"]]
    assert not over, f"over {result['budget']} B of shared memory: {over}"


def test_every_corner_lists_its_launches():
    """tools.kernel_launches calls the launchers as the library does (on meta tensors, nothing compiled): when a
    launcher's signature changes, the sweep's calls must follow (the block top-k's forced-block counts once did
    not). Every family lists at least one launch at every corner."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from tools.kernel_launches import corners, launches\n"
            "print(','.join(f'{c.family}:{len(launches(c))}' for c in corners()))")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [entry.split(":") for entry in proc.stdout.strip().split(",")]
    assert {family for family, _ in counts} == {"selected", "window", "decode", "misc"}
    assert all(int(n) > 0 for _, n in counts), counts
