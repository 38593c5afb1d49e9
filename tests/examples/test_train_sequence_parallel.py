"""The FSDP2 + sequence-parallel example trains on 2 CPU ranks (gloo, torchrun) and its loss falls, in
both shard layouts alike."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> list[float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "train_sequence_parallel.py"), "--seq-len", "128", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [float(x) for x in re.findall(r"step +\d+ +loss ([0-9.]+)", done.stdout)]


def test_example_trains_on_two_cpu_ranks():
    """The default (balanced) layout trains; the contiguous layout gives the same losses (the loss of a
    step does not depend on how the sequence is split)."""
    losses = _run("--steps", "8")
    assert len(losses) == 8, losses
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], f"the loss did not fall: {losses}"
    contiguous = _run("--steps", "3", "--layout", "contiguous")
    assert len(contiguous) == 3 and all(abs(a - b) <= 1e-3 * b for a, b in zip(contiguous, losses)), (contiguous, losses)
