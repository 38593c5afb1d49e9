"""One JSON file per training run under DIR/runs/, shared by the benchmarks that sweep runs (retrieval,
lm): the path of a run, an atomic write (a killed process never leaves half a file), and reading
them all back."""

from __future__ import annotations

import json
import os
from pathlib import Path

RUNS_DIR = "runs"


def run_path(out: Path, run_id: str) -> Path:
    return out / RUNS_DIR / f"{run_id}.json"


def write_run(out: Path, run: dict) -> Path:
    """Write, then rename over the old file."""
    path = run_path(out, run["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    tmp.replace(path)
    return path


def load_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / RUNS_DIR).glob("*.json"))]


def finished_earlier(out: Path, run_id: str, config: dict) -> bool:
    """Whether a finished run of this configuration is already in `out` (a sweep resumes past it)."""
    path = run_path(out, run_id)
    if not path.exists():
        return False
    done = json.loads(path.read_text())
    return done.get("status") == "finished" and done.get("config") == config
