"""Shared memory of every kernel the launchers can pick, across the documented support matrix,
compiled ahead of time for an H100 (sm_90) on any machine with Triton's NVIDIA backend (no GPU).

Each configuration's launches are recorded from the real launchers (kernel_launches.py) and
compiled as Triton would compile them at launch; `metadata.shared` is compared with the budget.

Launches whose tiles are the same compile once (`--exact` compiles every distinct launch): the
key is the kernel, its argument dtypes, num_warps, num_stages and every constexpr except those
that only bound masks or index arithmetic (VALUE_ONLY: the head dims' true sizes, the block's,
the group's, the rows'), and fp16 counts as bf16. `--validate N` compiles N launches that differ
from their representative and reports any difference in shared memory.

    python -m tools.smem_sweep                      # the support matrix (hours on 2 CPU cores)
    python -m tools.smem_sweep --corners            # every kernel's largest tiles (minutes)
    python -m tools.smem_sweep --ci --json out.json # the CI test's (tests/kernels/test_smem.py)
    python -m tools.smem_sweep --dims 128,256 --blocks 64,128 --families selected
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

from tools.aot import SM90_SHARED_LIMIT, compile_launch, lowered_metadata, prepare
from tools.kernel_launches import Config, ci_corners, corners, launches, support_matrix

# What the sweep accepts: the limit Triton checks at launch on an H100. No margin under it: the
# figure is exact for one Triton version (the allocation is deterministic, the launch compares the
# same number), while versions differ by far more than a margin would cover (D 256, block 128, by
# query dK/dV: 279552 B in Triton 3.6, 197632 in 3.9); sweep with the device's version (PYTHONPATH)
# and the local one. Launches within TIGHT of the limit are listed (the paper shape's measured
# by-block dK/dV, 231936 B in 3.6, is one).
SHARED_BUDGET = SM90_SHARED_LIMIT
TIGHT = 8 * 1024
VALUE_ONLY = {"D", "DV", "BLOCK", "G", "ROWS", "S", "K", "SEL", "PAGE", "PAIRS"}

_JOBS: list = []  # (prepared) for the forked workers
_FULL = [False]  # compile to a cubin (ptxas) rather than to LLVM IR


def tile_key(prepared) -> tuple:
    src = prepared.source
    names = src.fn.arg_names
    consts = tuple(sorted((names[k[0]], repr(v)) for k, v in src.constants.items() if names[k[0]] not in VALUE_ONLY))
    sig = tuple(v.replace("fp16", "bf16") for _, v in sorted(src.signature.items()) if v != "constexpr")
    return src.name, sig, consts, prepared.options.num_warps, prepared.options.num_stages


def _compile(i: int) -> dict:
    start = time.perf_counter()
    try:
        if _FULL[0]:
            meta = compile_launch(_JOBS[i]).metadata._asdict()
        else:
            meta = lowered_metadata(_JOBS[i])
        return dict(shared=meta["shared"], num_warps=meta["num_warps"], num_stages=meta["num_stages"],
                    seconds=time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001  (a kernel that does not compile is a result too)
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200],
                    seconds=time.perf_counter() - start)


def compile_all(prepared: list, jobs: int, cache: dict, save=None) -> list[dict]:
    """Results of compiling each prepared launch (cache: by exact key, updated in place; save():
    called every few results)."""
    todo = [i for i, p in enumerate(prepared) if p.key not in cache]
    _JOBS[:] = prepared
    start = time.perf_counter()
    if jobs > 1 and len(todo) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.imap(_compile, todo)
            for n, (i, r) in enumerate(zip(todo, results)):
                cache[prepared[i].key] = r
                _progress(n, len(todo), start, save)
    else:
        for n, i in enumerate(todo):
            cache[prepared[i].key] = _compile(i)
            _progress(n, len(todo), start, save)
    return [cache[p.key] for p in prepared]


def _progress(n: int, total: int, start: float, save) -> None:
    if (n + 1) % 10 == 0 or n + 1 == total:
        print(f"  compiled {n + 1} / {total} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if save is not None:
            save()


def sweep(configs: list[Config], jobs: int = 1, exact: bool = False, cache: dict | None = None, save=None) -> list[dict]:
    """One row per (configuration, scheme, kernel launch): its shared memory (from its representative)."""
    cache = {} if cache is None else cache
    rows, reps = [], {}
    for cfg in configs:
        for scheme, launch in launches(cfg):
            p = prepare(launch)
            rep = reps.setdefault(p.key if exact else tile_key(p), p)
            rows.append(dict(config=cfg.label(), scheme=scheme, kernel=launch.name,
                             warps=p.options.num_warps, stages=p.options.num_stages, _rep=rep.key, _p=p))
    unique = list(reps.values())
    print(f"{len(configs)} configurations, {len(rows)} launches, {len(unique)} to compile "
          f"({sum(p.key not in cache for p in unique)} not cached)", file=sys.stderr, flush=True)
    compile_all(unique, jobs, cache, save)
    for r in rows:
        r.update(cache[r.pop("_rep")])
        r.pop("_p")
    return rows


def validate(configs: list[Config], n: int, jobs: int, cache: dict, seed: int = 0, save=None) -> list[dict]:
    """Compile n launches that are not their tile key's representative; rows where shared differs."""
    reps, others = {}, []
    for cfg in configs:
        for scheme, launch in launches(cfg):
            p = prepare(launch)
            rep = reps.setdefault(tile_key(p), p)
            if rep.key != p.key:
                others.append((cfg, scheme, launch.name, p, rep))
    sample = random.Random(seed).sample(others, min(n, len(others)))
    results = compile_all([s[3] for s in sample] + [s[4] for s in sample], jobs, cache, save)
    half = len(sample)
    return [dict(config=c.label(), scheme=s, kernel=k, shared=a.get("shared"), representative=b.get("shared"))
            for (c, s, k, _, _), a, b in zip(sample, results[:half], results[half:]) if a.get("shared") != b.get("shared")]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corners", action=argparse.BooleanOptionalAction, default=False,
                    help="only the corners (kernel_launches.corners)")
    ap.add_argument("--ci", action=argparse.BooleanOptionalAction, default=False,
                    help="only the CI test's corners (kernel_launches.ci_corners)")
    ap.add_argument("--families", default="selected,window,decode,misc")
    ap.add_argument("--dims", type=_ints, default=(256, 128, 64, 32, 16))
    ap.add_argument("--blocks", type=_ints, default=(128, 64, 32, 16))
    ap.add_argument("--groups", type=_ints, default=(1, 4, 8, 16))
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--minor", action=argparse.BooleanOptionalAction, default=False,
                    help="also non-causal and without gates")
    ap.add_argument("--exact", action=argparse.BooleanOptionalAction, default=False,
                    help="compile every distinct launch (no tile-key sharing)")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=False,
                    help="compile to cubins (ptxas), not only to LLVM IR")
    ap.add_argument("--validate", type=int, default=0, help="also compile N non-representatives and compare")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--budget", type=int, default=SHARED_BUDGET, help="bytes of shared memory a kernel may use")
    ap.add_argument("--cache", default=None, help="JSON file of compiled results by exact key (resumable)")
    ap.add_argument("--json", default=None, help="write every row here")
    args = ap.parse_args()

    if args.corners or args.ci:
        configs = ci_corners() if args.ci else corners()
    else:
        families = args.families.split(",")
        both = (True, False) if args.minor else (True,)
        configs = [c for c in support_matrix(args.dims, args.blocks, args.groups, tuple(args.dtypes.split(",")), both, both)
                   if c.family in families]
    _FULL[0] = args.full
    cache = json.loads(Path(args.cache).read_text()) if args.cache and os.path.exists(args.cache) else {}
    save = (lambda: Path(args.cache).write_text(json.dumps(cache))) if args.cache else None
    start = time.perf_counter()
    rows = sweep(configs, args.jobs, args.exact, cache, save)
    mismatches = validate(configs, args.validate, args.jobs, cache, save=save) if args.validate else []
    report(rows, args.budget, time.perf_counter() - start)
    if args.validate:
        print(f"\nvalidation: {args.validate} launches against their representative, {len(mismatches)} differ")
        for m in mismatches:
            print(f"  {m}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(budget=args.budget, limit=SM90_SHARED_LIMIT, rows=rows), indent=1))


def report(rows: list[dict], budget: int, seconds: float) -> None:
    over = [r for r in rows if r.get("shared", 0) > budget]
    tight = [r for r in rows if budget - TIGHT < r.get("shared", 0) <= budget]
    errors = [r for r in rows if "error" in r]
    worst: dict[str, dict] = {}
    for r in rows:
        if r.get("shared", -1) > worst.get(r["kernel"], {}).get("shared", -1):
            worst[r["kernel"]] = r
    print(f"\n{len(rows)} launches in {seconds:.0f} s; budget {budget} B (limit {SM90_SHARED_LIMIT}); "
          f"{len(over)} over the budget, {len(errors)} failed to compile\n")
    print(f"{'kernel':40s} {'max shared':>10s}  warps stages  at")
    for name, r in sorted(worst.items()):
        print(f"{name:40s} {r['shared']:10d}  {r['warps']:5d} {r['stages']:6d}  {r['config']} / {r['scheme']}")
    for title, items in (("over the budget", over), (f"within {TIGHT} B of it", tight), ("compile errors", errors)):
        if items:
            print(f"\n{title}:")
            for r in sorted(items, key=lambda r: -r.get("shared", 0)):
                print(f"  {r.get('shared', r.get('error'))!s:>8}  {r['kernel']} w{r['warps']} s{r['stages']}  "
                      f"{r['config']} / {r['scheme']}")


if __name__ == "__main__":
    main()
