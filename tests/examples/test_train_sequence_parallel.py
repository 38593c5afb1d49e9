"""The FSDP2 + sequence-parallel example trains on 2 CPU ranks (gloo, torchrun) and its loss falls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_example_trains_on_two_cpu_ranks():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "train_sequence_parallel.py"), "--steps", "8", "--seq-len", "128"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([0-9.]+)", done.stdout)]
    assert len(losses) == 8, done.stdout
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], f"the loss did not fall: {losses}"
