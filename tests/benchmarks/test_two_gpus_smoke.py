"""python -m benchmarks.distributed.two_gpus runs end to end on 2 CPU ranks (gloo, --smoke) and passes its check
in both shard layouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_two_gpu_script_smoke_on_two_cpu_ranks():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "benchmarks.distributed.two_gpus", "--smoke", "--reps", "1"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for layout in ("contiguous", "balanced"):
        assert f"correctness at 48 tokens, {layout} layout: PASS" in done.stdout, done.stdout
        assert f"\n| {layout} | " in done.stdout, done.stdout  # its row of the scaling table
    assert "| layout | one device | 2 ranks | speed-up |" in done.stdout, done.stdout
