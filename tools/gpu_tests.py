"""The gpu-marked tests, one pytest process per file with its own time limit, each file's log and
result written to --out as it finishes: on a lent GPU whose command has a hard limit, what ran comes
back even when a later file is cut off, and a failure is named (every failure, not the first).

    python -m tools.gpu_tests --out $OUT/gpu tests/kernels/test_block_topk.py tests/kernels/test_selected_tiles.py
    python -m tools.gpu_tests --out $OUT/gpu --per-file 90 --budget 400 tests/kernels   # a folder: its test files

Prints one line per file (passed / failed / skipped counts, seconds, or "cut off") and the failed
test ids; exits 1 when a file failed or was cut off.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors|deselected)")


def test_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("test_*.py"))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"paths must be test files or folders, got {str(p)!r}")
    return files


def run_file(path: Path, out: Path, limit: float) -> dict:
    log = out / (str(path).replace("/", "__") + ".log")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rf", str(path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit, env=env).returncode
            cut = False
        except subprocess.TimeoutExpired:
            code, cut = None, True
    text = log.read_text(errors="replace")
    counts = {word.rstrip("s") if word.startswith("error") else word: int(n) for n, word in SUMMARY.findall(text[-2000:])}
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {"file": str(path), "returncode": code, "cut_off": cut, "seconds": round(time.perf_counter() - start, 1),
            "counts": counts, "failed": failed, "log": log.name}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_tests", description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="test files or folders")
    ap.add_argument("--out", type=Path, required=True, help="folder for the logs and results.json")
    ap.add_argument("--per-file", type=float, default=150.0, help="seconds one file may take")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all files; the rest are not started")
    args = ap.parse_args(argv)
    try:
        files = test_files(args.paths)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results, start, bad = [], time.perf_counter(), False
    for path in files:
        left = None if args.budget is None else args.budget - (time.perf_counter() - start)
        if left is not None and left < 5:
            results.append({"file": str(path), "not_started": True})
            print(f"{path}: not started (budget)", flush=True)
            continue
        r = run_file(path, args.out, args.per_file if left is None else min(args.per_file, left))
        results.append(r)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        state = "cut off" if r["cut_off"] else ", ".join(f"{n} {w}" for w, n in r["counts"].items()) or "no tests"
        print(f"{path}: {state} ({r['seconds']} s)", flush=True)
        for test in r["failed"]:
            print(f"  FAILED {test}", flush=True)
        bad |= r["cut_off"] or bool(r["failed"]) or (r["returncode"] not in (0, 5))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
