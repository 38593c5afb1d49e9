"""The command line of the retrieval benchmark: parse, run every (task and length, model, learning
rate, seed) in turn, write each run's JSON as it goes, then the summary, the table and the picture.

A run whose finished JSON is already in --out with the same configuration is not run again, so
an interrupted sweep (a 10-minute command limit) resumes where it stopped when the same command
is repeated; processes with different --models (or seeds) may share one --out directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from benchmarks import devices
from benchmarks.quality_report import environment
from benchmarks.retrieval.models import DEFAULT_MODELS, build_model
from benchmarks.retrieval.report import plot, print_table, summarize, write_summary
from benchmarks.run_store import finished_earlier, load_runs, write_run
from benchmarks.retrieval.settings import (
    FULL,
    SMOKE,
    BenchmarkSettings,
    task_lengths,
    train_settings,
    variants,
    with_overrides,
)
from benchmarks.retrieval.training import train_run

console = Console(width=None if sys.stdout.isatty() else 160)

USAGE = """examples:
  python -m benchmarks.retrieval --smoke --out /tmp/retrieval           # CPU, seconds (the CI run)
  python -m benchmarks.retrieval --out runs/needle4k --tasks needle --needle-lengths 4096
  python -m benchmarks.retrieval --out runs/x --models nsa,nsa_paper \\
      --define 'nsa_paper={"attention": "nsa", "options": {"independent_kv": true}}'
  python -m benchmarks.retrieval --out runs/needle4k --report-only      # table + PNG from the JSONs
"""


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


LIST_ARGUMENTS = {"tasks": _names, "models": _names, "needle_lengths": _ints, "mqar_lengths": _ints, "seeds": _ints,
                  "lrs": _floats}
INT_ARGUMENTS = ("steps", "batch", "eval_every", "eval_rows", "warmup_steps", "sync_every", "needle_values",
                 "min_distance", "curriculum_start", "mqar_pairs", "mqar_vocab", "cpu_threads",
                 "dim", "depth", "heads", "kv_heads", "dim_head", "ff_mult", "window", "compress_block",
                 "compress_stride", "selection_block", "num_selected", "compress_hidden")
FLOAT_ARGUMENTS = ("curriculum_threshold", "time_budget_s", "stop_at_accuracy")
TEXT_ARGUMENTS = ("device", "precision", "backend")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.retrieval", description=sys.modules["benchmarks.retrieval"].__doc__,
                                 epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for runs/*.json, the summary and the PNG")
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="everything tiny on the CPU (the CI run)")
    ap.add_argument("--report-only", action=argparse.BooleanOptionalAction, default=False,
                    help="no training: the table and PNG of --out's runs")
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="skip runs whose finished JSON exists (--no-resume: run them again)")
    ap.add_argument("--tasks", help="comma-separated: needle,mqar")
    ap.add_argument("--models", help=f"comma-separated among {','.join(DEFAULT_MODELS)} and --define'd ones")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=JSON",
                    help='declare a variant, e.g. nsa_x={"attention": "nsa", "branches": ["selected"], '
                         '"all_blocks": false, "options": {...}} (repeatable)')
    ap.add_argument("--nsa-options", metavar="JSON", help="SparseAttention options for every nsa variant")
    ap.add_argument("--needle-lengths", help="needle target lengths, e.g. 4096,16384")
    ap.add_argument("--mqar-lengths", help="MQAR row lengths, e.g. 512,2048")
    ap.add_argument("--seeds", help="comma-separated seeds (default 0,1)")
    ap.add_argument("--lrs", help="comma-separated peak learning rates")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.compile the training steps")
    for name in INT_ARGUMENTS:
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    for name in FLOAT_ARGUMENTS:
        ap.add_argument("--" + name.replace("_", "-"), type=float)
    for name in TEXT_ARGUMENTS:
        ap.add_argument("--" + name.replace("_", "-"))
    return ap.parse_args(argv)


def _json_argument(name: str, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} must be JSON: {err}") from None


def settings_from_arguments(args: argparse.Namespace) -> BenchmarkSettings:
    overrides: dict = {}
    for name, parse in LIST_ARGUMENTS.items():
        text = getattr(args, name)
        if text is not None:
            try:
                overrides[name] = parse(text)
            except ValueError:
                raise ValueError(f"{name} must be a comma-separated list, got {text!r}") from None
    for name in INT_ARGUMENTS + FLOAT_ARGUMENTS + TEXT_ARGUMENTS:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    for name in ("curriculum_start", "time_budget_s"):  # 0: off
        if overrides.get(name) == 0:
            overrides[name] = None
    if args.compile:
        overrides["compile"] = True
    if args.nsa_options is not None:
        overrides["nsa_options"] = _json_argument("nsa_options", args.nsa_options)
    defined = {}
    for item in args.define:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"define must be NAME=JSON, got {item!r}")
        defined[name.strip()] = _json_argument(f"define {name.strip()}", text)
    if defined:
        overrides["defined"] = defined
    return with_overrides(SMOKE if args.smoke else FULL, **overrides)


def resolve_device(s: BenchmarkSettings) -> tuple[torch.device, str]:
    return devices.resolve_device(s.device, s.precision)


def log(message: str) -> None:
    console.print(f"  {message}", highlight=False)


def run_one(s: BenchmarkSettings, task, length: int, name: str, variant, lr: float, seed: int, out: Path,
            device: torch.device, precision: str, env: dict, resume: bool) -> None:
    """Train one run, its JSON rewritten after every evaluation; skipped when a finished JSON of the
    same configuration is in `out` (resume)."""
    run_id = f"{task.name}-{length}-{name}-lr{lr:g}-seed{seed}"
    ts = train_settings(s, task, length, lr, seed)
    config = {"shape": s.to_dict()["shape"], "train": ts.to_dict(), "task": vars(task).copy(),
              "variant": variant.to_dict(), "precision": precision, "backend": s.backend, "compile": s.compile}
    if resume and finished_earlier(out, run_id, config):
        console.print(f"[dim]{run_id}: finished earlier, kept[/dim]", highlight=False)
        return
    console.print(f"[bold]{run_id}[/bold]", highlight=False)
    model = build_model(variant, s.shape, task.vocab_size, length, seed, s.backend).to(device)
    step_model = torch.compile(model) if s.compile else model
    run = {"id": run_id, "task": {"name": task.name, "length": length, "chance": task.chance,
                                  "vocab_size": task.vocab_size},
           "model": name, "lr": lr, "seed": seed, "config": config, "environment": env,
           "params": sum(p.numel() for p in model.parameters()),
           "attention_params": sum(p.numel() for p in model.attentions.parameters())}
    record = train_run(model, task, ts, device, precision, on_eval=lambda r: write_run(out, {**run, **r}), log=log,
                       step_model=step_model)
    log(f"{record['steps']} steps in {record['wall_seconds']} s ({record['stopped']}); "
        f"steps to 0.9 / 0.95: {record['steps_to']['0.9']} / {record['steps_to']['0.95']}")


def run_all(s: BenchmarkSettings, out: Path, resume: bool) -> None:
    device, precision = resolve_device(s)
    if s.cpu_threads is not None:
        torch.set_num_threads(s.cpu_threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    env = environment(device, precision)
    chosen = variants(s)
    for task, lengths in task_lengths(s):
        for length in lengths:
            for name, variant in chosen.items():
                for lr in s.lrs:
                    for seed in s.seeds:
                        run_one(s, task, length, name, variant, lr, seed, out, device, precision, env, resume)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()


def report(out: Path) -> list[dict]:
    runs = load_runs(out)
    rows = summarize(runs)
    write_summary(rows, out)
    print_table(rows, console)
    picture = plot(runs, rows, out)
    console.print(f"{len(runs)} runs in {out}" + (f"; picture {picture}" if picture else
                                                    "; no PNG (matplotlib missing: pip install 'nsa[plot]')"),
                  highlight=False)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        settings = settings_from_arguments(args)
        resolve_device(settings)
    except (ValueError, TypeError) as err:
        console.print(f"error: {err}", highlight=False, soft_wrap=True)
        return 2
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(settings, args.out, resume=args.resume)
    report(args.out)
    console.print(f"done in {time.perf_counter() - start:.0f} s", highlight=False)
    return 0
