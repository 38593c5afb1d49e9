"""The command line of the language-model comparison: parse, train every (model, learning rate,
seed) in turn, write each run's JSON as it goes, then the summary, the table and the picture.

A run whose finished JSON is already in --out with the same configuration is not run again, so one
10-minute command can train one run and the next command the next (`--models dense --seeds 0`). A run
longer than one command pauses into --checkpoint-dir when --command-budget-s runs out and the next
command with the same arguments continues it.
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
from benchmarks.lm.corpus import load_corpus
from benchmarks.lm.models import build_model, parameter_counts
from benchmarks.lm.report import plot, print_table, run_id, summarize, write_summary
from benchmarks.lm.settings import SCHEDULES, SMOKE, LMSettings, with_overrides
from benchmarks.lm.training import train_run
from benchmarks.quality_report import environment
from benchmarks.run_store import finished_earlier, load_runs, write_run

console = Console(width=None if sys.stdout.isatty() else 180)

USAGE = """examples:
  python -m benchmarks.lm --smoke --out /tmp/lm                       # CPU, seconds (the CI run)
  python -m benchmarks.lm --out runs/lm --models nsa --seeds 0        # one run per 10-minute command
  python -m benchmarks.lm --out runs/lm1500 --schedule sweep --models nsa --seeds 0   # the 1500-step runs
  python -m benchmarks.lm --out runs/lm --report-only                 # table + PNG from the JSONs
  python -m benchmarks.lm --out runs/lm --models nsa --seeds 0 --steps 3000 --checkpoint-dir /tmp/ckpt \
      --command-budget-s 560                                          # run it twice: one run over two commands
"""
INT_ARGUMENTS = ("context", "batch", "steps", "warmup_steps", "eval_every", "val_rows", "capped_context",
                 "corpus_max_bytes", "cpu_threads", "dim", "depth", "heads", "kv_heads", "dim_head", "ff_mult",
                 "window", "compress_block", "compress_stride", "selection_block", "num_selected", "compress_hidden")
FLOAT_ARGUMENTS = ("time_budget_s", "val_fraction", "compression_lr_scale")
TEXT_ARGUMENTS = ("corpus", "device", "precision", "backend")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lm", description=sys.modules["benchmarks.lm"].__doc__,
                                 epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for runs/*.json, the summary and the PNG")
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="everything tiny on the CPU (the CI run)")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default="full",
                    help="full: 6000 steps or 480 s per run; sweep: the 1500-step schedule of the sweep and design "
                    "runs (100 warmup steps, evaluations every 250, no time budget); flags below override either")
    ap.add_argument("--report-only", action=argparse.BooleanOptionalAction, default=False,
                    help="no training: the table and PNG of --out's runs")
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="skip runs whose finished JSON exists (--no-resume: run them again)")
    ap.add_argument("--checkpoint-dir", type=Path, help="save each run's state here at every evaluation and "
                    "resume a run from its file (deleted when the run finishes)")
    ap.add_argument("--command-budget-s", type=float, help="wall seconds this command may train for: the run "
                    "pauses at the last evaluation it can reach within them (needs --checkpoint-dir)")
    ap.add_argument("--models", help="comma-separated among dense,window,nsa,no_selection")
    ap.add_argument("--seeds", help="comma-separated seeds")
    ap.add_argument("--lrs", help="comma-separated peak learning rates")
    ap.add_argument("--buckets", help="position bucket edges, e.g. 0,512,2048,8192")
    ap.add_argument("--nsa-options", metavar="JSON", help="SparseAttention options of the nsa and no_selection models "
                    "(default: the paper_scratch options)")
    for name in INT_ARGUMENTS:
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    for name in FLOAT_ARGUMENTS:
        ap.add_argument("--" + name.replace("_", "-"), type=float)
    for name in TEXT_ARGUMENTS:
        ap.add_argument("--" + name.replace("_", "-"))
    return ap.parse_args(argv)


def _numbers(name: str, text: str, kind):
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None


def settings_from_arguments(args: argparse.Namespace) -> LMSettings:
    overrides = {n: getattr(args, n) for n in INT_ARGUMENTS + FLOAT_ARGUMENTS + TEXT_ARGUMENTS
                 if getattr(args, n) is not None}
    if overrides.get("time_budget_s") == 0:
        overrides["time_budget_s"] = None
    if args.models is not None:
        overrides["models"] = tuple(args.models.split(","))
    if args.seeds is not None:
        overrides["seeds"] = _numbers("seeds", args.seeds, int)
    if args.lrs is not None:
        overrides["lrs"] = _numbers("lrs", args.lrs, float)
    if args.buckets is not None:
        overrides["buckets"] = _numbers("buckets", args.buckets, int)
    if args.nsa_options is not None:
        try:
            overrides["nsa_options"] = json.loads(args.nsa_options)
        except json.JSONDecodeError as err:
            raise ValueError(f"nsa_options must be JSON: {err}") from None
    return with_overrides(SMOKE if args.smoke else SCHEDULES[args.schedule], **overrides)


def log(message: str) -> None:
    console.print(f"  {message}", highlight=False)


def run_one(s: LMSettings, corpus, model_name: str, lr: float, seed: int, out: Path, device: torch.device,
            precision: str, env: dict, resume: bool, checkpoint_dir: Path | None = None,
            command_budget_s: float | None = None) -> bool:
    """Train one run (unless it finished earlier); False when it paused for a later command."""
    identifier = run_id(model_name, lr, seed)
    # what this run depends on, as its JSON holds it (tuples become lists)
    config = json.loads(json.dumps({**s.to_dict(), "models": None, "lrs": None, "seeds": None}))
    if resume and finished_earlier(out, identifier, config):
        console.print(f"[dim]{identifier}: finished earlier, kept[/dim]", highlight=False)
        return True
    console.print(f"[bold]{identifier}[/bold]", highlight=False)
    model = build_model(model_name, s.shape, seed, s.nsa_options, s.backend).to(device)
    run = {"id": identifier, "model": model_name, "lr": lr, "seed": seed, "config": config, "environment": env,
           "corpus": corpus.description, "status": "running", **parameter_counts(model)}
    checkpoint = None if checkpoint_dir is None else checkpoint_dir / f"{identifier}.pt"
    record = train_run(model, corpus, s, lr, seed, device, precision, log,
                       on_eval=lambda partial: write_run(out, {**run, **partial}), checkpoint=checkpoint,
                       config=config, command_budget_s=command_budget_s)
    if record.pop("paused"):
        write_run(out, {**run, **record, "status": "paused"})
        log(f"paused at step {record['steps']}; the same command again continues from {checkpoint}")
        return False
    run.update(record, status="finished")
    write_run(out, run)
    log(f"{record['tokens']:,} tokens in {record['train_seconds']} s ({record['tokens_per_s']:,.0f} tokens/s); "
        f"final {record['final']['full']['bpb']:.4f} bpb")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return True


def report(out: Path) -> dict:
    summary = summarize(load_runs(out))
    print_table(summary, console)
    write_summary(summary, out)
    runs = load_runs(out)
    picture = plot(runs, out)
    why = "no curves yet" if not any(r.get("val") for r in runs) else "pip install 'nsa[plot]'"
    console.print(f"{len(runs)} runs in {out}" + (f"; picture {picture}" if picture else f"; no PNG ({why})"),
                  highlight=False)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        settings = settings_from_arguments(args)
        device, precision = devices.resolve_device(settings.device, settings.precision)
        if args.command_budget_s is not None and not args.command_budget_s > 0:
            raise ValueError(f"command_budget_s must be > 0 seconds, got {args.command_budget_s!r}")
        if args.command_budget_s is not None and args.checkpoint_dir is None:
            raise ValueError("command_budget_s needs --checkpoint-dir, the directory a paused run is saved to")
    except ValueError as err:
        console.print(f"error: {err}", highlight=False, soft_wrap=True)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.report_only:
        if settings.cpu_threads is not None:
            torch.set_num_threads(settings.cpu_threads)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        corpus = load_corpus(settings.corpus, settings.val_fraction, settings.corpus_max_bytes)
        console.print(f"corpus {settings.corpus}: {corpus.description['files']:,} files, "
                      f"{corpus.description['train_bytes']:,} train / {corpus.description['val_bytes']:,} validation "
                      f"bytes; {settings.tokens_per_step:,} tokens per step", highlight=False)
        env = environment(device, precision)
        runs = [(m, lr, seed) for m in settings.models for lr in settings.lrs for seed in settings.seeds]
        for model_name, lr, seed in runs:
            left = None if args.command_budget_s is None else args.command_budget_s - (time.perf_counter() - start)
            if left is not None and left <= 0:
                console.print(f"the command's {args.command_budget_s:.0f} s are spent: "
                              f"{run_id(model_name, lr, seed)} and later runs wait for the next command", highlight=False)
                break
            if not run_one(settings, corpus, model_name, lr, seed, args.out, device, precision, env,
                           resume=args.resume, checkpoint_dir=args.checkpoint_dir, command_budget_s=left):
                break
    report(args.out)
    console.print(f"done in {time.perf_counter() - start:.0f} s", highlight=False)
    return 0
